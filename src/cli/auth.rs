//! `contacts-etl auth`: arguments (the doc comments are the help), and the printing of what
//! the jobs in [`crate::app::auth`] return.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::api::DEFAULT_BASE_URL;
use crate::app::auth::{AppRef, LoginJob};
use crate::app::env::{
    HL_AUTHORIZE_URL, HL_BASE_URL, HL_CLIENT_ID, HL_CLIENT_SECRET, HL_TOKEN_STORE,
};
use crate::app::Outcome;
use crate::auth::{StoredToken, UserType, DEFAULT_AUTHORIZE_URL};
use crate::term::Escaped;

#[derive(Debug, Args)]
pub struct AuthArgs {
    #[command(subcommand)]
    pub command: AuthCommand,
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Log in with a Marketplace app (OAuth 2.0 authorization code) and save the tokens.
    ///
    /// Prints the consent URL: open it in a browser on this machine, choose the location (or
    /// the agency), and the browser is redirected to a listener on 127.0.0.1 that receives
    /// the code. The code is exchanged for an access token and a refresh token, saved in the
    /// token store (mode 0600). Runs refresh them from then on; each refresh replaces the
    /// refresh token in the store.
    ///
    /// The app must list the redirect URI http://127.0.0.1:PORT/callback: pass that PORT as
    /// --redirect-port.
    ///
    /// Example: HL_CLIENT_SECRET=... contacts-etl auth login --client-id 65f0...-lx3k --redirect-port 8976
    Login(LoginArgs),
    /// Show what the token store holds: each grant's location or agency, scopes and expiry
    /// (never the tokens).
    Status(StatusArgs),
    /// List the locations where the app is installed, using the agency grant in the store.
    Locations(LocationsArgs),
}

/// Where the tokens are kept.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The token store file. Default: $XDG_CONFIG_HOME/contacts-etl/tokens.json or
    /// ~/.config/contacts-etl/tokens.json. It must not be readable by other users.
    #[arg(long, env = HL_TOKEN_STORE, value_name = "FILE")]
    pub token_store: Option<PathBuf>,
}

impl StoreArgs {
    pub fn path(&self) -> Result<PathBuf, Outcome> {
        crate::app::auth::store_path(self.token_store.as_ref())
    }
}

/// The app's credentials. The secret never appears on the command line.
#[derive(Debug, Args)]
pub struct AppArgs {
    /// The app's client id (Marketplace → your app → Auth).
    #[arg(long, env = HL_CLIENT_ID, value_name = "ID")]
    pub client_id: String,

    /// The environment variable holding the client secret.
    #[arg(long, default_value = HL_CLIENT_SECRET, value_name = "VAR")]
    pub client_secret_env: String,

    /// Read the client secret from this file instead.
    #[arg(long, value_name = "FILE")]
    pub client_secret_file: Option<PathBuf>,

    /// API base URL (the OAuth endpoints live on the API host). Plain http is refused except
    /// to a loopback address.
    #[arg(long, env = HL_BASE_URL, default_value = DEFAULT_BASE_URL)]
    pub base_url: String,
}

impl AppArgs {
    pub fn app(&self) -> AppRef {
        AppRef {
            client_id: self.client_id.clone(),
            client_secret_env: self.client_secret_env.clone(),
            client_secret_file: self.client_secret_file.clone(),
            base_url: self.base_url.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    #[command(flatten)]
    pub app: AppArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    /// Scopes to ask for, space- or comma-separated (at most what the app was granted).
    #[arg(
        long,
        default_value = "contacts.readonly contacts.write",
        value_name = "SCOPES"
    )]
    pub scope: String,

    /// Location: a token for one sub-account. Company: an agency token, from which location
    /// tokens are obtained for every location the app is installed on.
    #[arg(long, default_value = "Location", value_parser = parse_user_type)]
    pub user_type: UserType,

    /// Port of the loopback redirect listener (0: any free port; the app's redirect URI
    /// must then match, so a fixed port is usual).
    #[arg(long, default_value_t = 0, value_name = "PORT")]
    pub redirect_port: u16,

    /// The consent screen URL.
    #[arg(long, env = HL_AUTHORIZE_URL, default_value = DEFAULT_AUTHORIZE_URL, value_name = "URL")]
    pub authorize_url: String,

    /// How long to wait for the browser's redirect, in seconds.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub timeout: u64,
}

fn parse_user_type(s: &str) -> Result<UserType, String> {
    s.parse()
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct LocationsArgs {
    #[command(flatten)]
    pub app: AppArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    /// The agency (company) id; needed only when the store holds several agencies.
    #[arg(long, value_name = "COMPANY_ID")]
    pub company: Option<String>,
}

/// Runs `contacts-etl auth …`.
pub async fn run(args: &AuthArgs, quiet: bool) -> Outcome {
    let done = match &args.command {
        AuthCommand::Login(a) => login(a, quiet).await,
        AuthCommand::Status(a) => a.store.path().and_then(|p| status(&p)),
        AuthCommand::Locations(a) => locations(a).await,
    };
    done.err().unwrap_or(Outcome::Complete)
}

async fn login(args: &LoginArgs, quiet: bool) -> Result<(), Outcome> {
    let job = LoginJob {
        app: args.app.app(),
        store: args.store.path()?,
        scopes: args
            .scope
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        user_type: args.user_type,
        redirect_port: args.redirect_port,
        authorize_url: args.authorize_url.clone(),
        timeout: Duration::from_secs(args.timeout.max(1)),
    };
    let entry = job
        .run(|pending| {
            // Printed even with --quiet: the login cannot go on without it.
            eprintln!(
                "Open this URL in a browser on this machine and approve the app:\n\n  {}\n",
                pending.consent_url()
            );
            if !quiet {
                eprintln!("waiting for the redirect to {} …", pending.redirect_uri());
            }
        })
        .await?;
    if !quiet {
        eprintln!(
            "logged in: {} saved to {}",
            describe(&entry),
            job.store.display()
        );
    }
    Ok(())
}

/// The grant's location or agency, for a terminal: the ids came from the server, so they
/// are escaped ([`crate::term::escape`]), like every server value this module prints.
fn describe(e: &StoredToken) -> String {
    match e.user_type {
        UserType::Location => format!(
            "location {}",
            Escaped(e.location_id.as_deref().unwrap_or("?"))
        ),
        UserType::Company => format!(
            "agency (company) {}",
            Escaped(e.company_id.as_deref().unwrap_or("?"))
        ),
    }
}

fn status(path: &Path) -> Result<(), Outcome> {
    let entries = crate::app::auth::status(path)?;
    println!("token store: {}", path.display());
    if entries.is_empty() {
        println!("  (empty: run `contacts-etl auth login`)");
        return Ok(());
    }
    let now = crate::auth::Clock::now(&crate::auth::SystemClock);
    for e in &entries {
        let left = e.expires_at - now;
        let expiry = if left > 0 {
            format!("expires in {}h{:02}m", left / 3600, (left % 3600) / 60)
        } else {
            "expired".to_string()
        };
        let renewal = match (&e.refresh_token, e.user_type) {
            (Some(_), _) => "refresh token stored",
            (None, UserType::Location) => "renewed from the agency grant",
            (None, UserType::Company) => "no refresh token",
        };
        println!(
            "  {:<40} {:<9} {} (at {}), {renewal}; scope: {}",
            describe(e),
            e.user_type.as_str(),
            expiry,
            crate::timefmt::format_iso_millis(e.expires_at.saturating_mul(1000)),
            Escaped(e.scope.as_deref().unwrap_or("?")),
        );
    }
    Ok(())
}

async fn locations(args: &LocationsArgs) -> Result<(), Outcome> {
    let list =
        crate::app::auth::locations(&args.app.app(), args.store.path()?, args.company.as_deref())
            .await?;
    for l in &list {
        println!(
            "{}\t{}",
            Escaped(&l.id),
            Escaped(l.name.as_deref().unwrap_or(""))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_type_accepts_the_api_names_and_synonyms() {
        assert_eq!(parse_user_type("Location"), Ok(UserType::Location));
        assert_eq!(parse_user_type("agency"), Ok(UserType::Company));
        assert!(parse_user_type("user")
            .unwrap_err()
            .contains("Location or Company"));
    }
}
