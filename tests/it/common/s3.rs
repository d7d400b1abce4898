//! An S3-compatible server on loopback for the tests (`s3s-fs`, in the test process, storing
//! objects as files under a temporary directory), and `export` commands aimed at it.

use std::path::{Path, PathBuf};

use super::{TestSim, BIN};

pub const ACCESS_KEY: &str = "AKIATESTEXPORTS";
pub const SECRET_KEY: &str = "s3cr3t-do-not-print-0123456789";
pub const BUCKET: &str = "warehouse";

/// An S3-compatible server on 127.0.0.1 until dropped; objects are files under `root/BUCKET/`.
pub struct S3 {
    pub root: tempfile::TempDir,
    pub endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl S3 {
    pub async fn start() -> S3 {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        S3 {
            root,
            endpoint,
            task,
        }
    }

    /// The bucket's `prefix` as a directory, to read back as an export's OUT.
    pub fn dir(&self, prefix: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(prefix)
    }
}

/// `contacts-etl` with the server's credentials in the environment and `work` as the work
/// directory; killed when dropped.
pub fn s3_cmd(s3: &S3, work: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env("AWS_ENDPOINT", &s3.endpoint)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("CONTACTS_ETL_WORK_DIR", work)
        .env_remove("RUST_LOG")
        .env_remove("AWS_PROFILE")
        .kill_on_drop(true);
    cmd
}

/// `contacts-etl export` of the simulator's location into `s3://warehouse/<prefix>`
/// ([`s3_cmd`]), unpaced unless `extra` says otherwise.
pub fn s3_export(
    sim: &TestSim,
    s3: &S3,
    prefix: &str,
    work: &Path,
    extra: &[&str],
) -> tokio::process::Command {
    s3_location_cmd("export", sim, s3, prefix, work, extra)
}

/// `contacts-etl <command>` (`export`, `plan`) of the simulator's location into
/// `s3://warehouse/<prefix>`, as [`s3_export`].
pub fn s3_location_cmd(
    command: &str,
    sim: &TestSim,
    s3: &S3,
    prefix: &str,
    work: &Path,
    extra: &[&str],
) -> tokio::process::Command {
    let mut cmd = s3_cmd(s3, work);
    cmd.args([
        command,
        "--location",
        &sim.location(),
        "--out",
        &format!("s3://{BUCKET}/{prefix}"),
        "--concurrency",
        "16",
    ])
    .args(extra)
    .args(match extra.contains(&"--rate-limit") {
        true => &[][..],
        false => &["--rate-limit", "off"][..],
    })
    .env("HL_TOKEN", "test-token")
    .env("HL_BASE_URL", &sim.base_url);
    cmd
}
