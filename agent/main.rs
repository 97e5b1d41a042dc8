use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

use outpost::cli::{CertsCommand, Cli, Command, Role};
use outpost::config::{self, AnyConfig};
use outpost::tls::{self, Identity};
use outpost::{aggregator, demo, logging, manual, node, operator, snapshot_cmd};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tls::install_crypto_provider();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Config errors are already one line per problem.
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent { config } => {
            let cfg = config::load_agent(&config)?;
            logging::init(&cfg.log.level);
            actix_rt::System::new().block_on(node::run(cfg, &config))
        }
        Command::Aggregator { config } => {
            let cfg = config::load_aggregator(&config)?;
            logging::init(&cfg.log.level);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(aggregator::run(cfg, &config))
        }
        Command::CheckConfig { config } => {
            let kind = match config::load_any(&config)? {
                AnyConfig::Agent(_) => "agent",
                AnyConfig::Aggregator(_) => "aggregator",
            };
            println!("{}: valid {kind} config", config.display());
            Ok(())
        }
        Command::Certs { command } => {
            let written = match command {
                CertsCommand::Init { dir, sans, days } => tls::init_pki(&dir, &sans, days)?,
                CertsCommand::Issue {
                    role,
                    name,
                    dir,
                    days,
                } => {
                    let id = match role {
                        Role::Agent => Identity::Agent(name),
                        Role::Operator => Identity::Operator(name),
                    };
                    tls::issue_client(&dir, &id, days)?
                }
                CertsCommand::Server {
                    name,
                    dir,
                    sans,
                    days,
                } => tls::issue_aggregator(&dir, &name, &sans, days)?,
                CertsCommand::Revoke { role, name, dir } => {
                    let id = match role {
                        Role::Agent => Identity::Agent(name),
                        Role::Operator => Identity::Operator(name),
                    };
                    vec![tls::revoke(&dir, &id)?]
                }
            };
            for path in written {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Query(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(operator::run(&args.conn, args.command)),
        Command::Demo { duration } => {
            logging::init("error");
            actix_rt::System::new().block_on(demo::run(duration))
        }
        Command::Snapshot { command } => snapshot_cmd::run(command),
        Command::PackageAssets { out } => {
            for path in manual::write_package_assets(&out)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}
