//! `stateshift` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A line for the person at the terminal: on stdout, or on stderr while stdout is kept
/// for a machine (`migrate --json`: [`cli::human_to_stderr`]).
macro_rules! say {
    ($($t:tt)*) => { $crate::cli::say_line(&format!($($t)*)) };
}

mod cli;
mod kit;

use cli::bench::{self, BenchOptions};
use cli::PrintProgress;
use stateshift::config::Config;
use stateshift::logging::{self, LogFormat, LogStyle};
use stateshift::migrate::engine;

#[derive(Parser)]
#[command(
    name = "stateshift",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("STATESHIFT_COMMIT"), ")"),
    about = "Move a live InfluxDB service to a fresh instance, losing nothing"
)]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. info, debug, stateshift=debug.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// Log lines as text or as one JSON object per line (on stderr; under systemd each
    /// line starts with its journal priority).
    #[arg(long, global = true, env = "STATESHIFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the configuration is when neither `-c` nor `STATESHIFT_CONFIG` says.
const DEFAULT_CONFIG: &str = "/etc/stateshift/stateshift.yaml";

#[derive(Subcommand)]
enum Cmd {
    /// Migrate the source InfluxDB to the target named in the config, now.
    Migrate {
        #[arg(short, long, env = "STATESHIFT_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Do it without asking.
        #[arg(long)]
        yes: bool,
        /// Print the plan and check every dependency without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Write the per-phase timings and counts as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Print one JSON object on stdout when the migration ends (outcome, where the
        /// service runs, the error and its phase, the report); progress goes to stderr.
        #[arg(long, conflicts_with = "dry_run")]
        json: bool,
        /// Probe the service during the migration (10 writes and reads per second into
        /// the database `stateshift_probe`, created first and migrated with the rest) and
        /// write DIR/timeline.csv and DIR/timeline.svg.
        #[arg(long, value_name = "DIR")]
        timeline: Option<PathBuf>,
        /// Probe writes (and reads) per second with --timeline (1..=1000).
        #[arg(long, value_name = "N", default_value_t = 10, requires = "timeline",
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        timeline_rate: u32,
    },
    /// The configuration file, offline.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Run the service orchestrator: poll, predict, migrate, with its HTTP API.
    Daemon {
        #[arg(short, long, env = "STATESHIFT_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// After a migration failed past cutover: record where the service runs now.
    Resolve {
        #[arg(short, long, env = "STATESHIFT_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// `source` or `target` of the failed migration.
        #[arg(long, value_parser = ["source", "target"])]
        on: String,
    },
    /// Settle a migration that was interrupted (a crash, a kill), say what was found and
    /// done, and stop: before cutover it is rolled back, after verification its disposal
    /// is finished, in between it is resumed and verified.
    Recover {
        #[arg(short, long, env = "STATESHIFT_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Ask the running daemon to migrate now: `POST /migrate` on its API with the
    /// configured token (exit 0 accepted, 1 refused or unreachable, 2 config error).
    Trigger {
        #[arg(short, long, env = "STATESHIFT_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The daemon's API; default from `api.listen` (its loopback address when it
        /// listens on all), `https` when `api.tls_cert_file` is set (and trusted).
        #[arg(long)]
        url: Option<String>,
    },
    /// Stop the daemon's running migration: `POST /migrate/abort` on its API with the
    /// configured token. Before its cutover the migration rolls back (the service stays
    /// where it runs, the target goes); past it the abort is refused with the reason.
    /// Waits for the rollback and prints its outcome (exit 0 rolled back, 1 refused,
    /// unreachable or not settled in time, 2 config error). A `stateshift migrate` in a
    /// terminal is aborted with Ctrl-C.
    Abort {
        #[arg(short, long, env = "STATESHIFT_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The daemon's API; default as for `trigger`.
        #[arg(long)]
        url: Option<String>,
        /// Return once the abort is accepted, without waiting for the rollback.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the rollback.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show the service's state: where it runs, the last migrations, anything to recover.
    Status {
        #[arg(short, long, env = "STATESHIFT_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// One JSON object on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the data-migration demo on this machine: two local InfluxDB servers, a live
    /// writer, one migration, an independent count.
    Demo {
        /// Where the demo's servers keep their files (removed at the end).
        #[arg(long, default_value = "/tmp/stateshift-demo")]
        dir: PathBuf,
        /// Points to seed on the old server.
        #[arg(long, default_value_t = 200_000)]
        points: u64,
        /// After the migration, keep the daemon and its status page running until Ctrl-C.
        #[arg(long)]
        serve: bool,
    },
    /// Predict the next load value, or evaluate the predictors on a trace.
    Predict {
        /// Sliding window length.
        #[arg(long, default_value_t = 5)]
        window: usize,
        /// Fewer readings than this: no prediction.
        #[arg(long, default_value_t = 3)]
        min: usize,
        /// guarded (the trigger's predictor), gm11, last or ewma.
        #[arg(long, default_value = "guarded")]
        model: String,
        /// Evaluate every model on a `timestamp,value` CSV trace instead.
        #[arg(long, conflicts_with = "values")]
        eval: Option<PathBuf>,
        /// Threshold for the trigger-quality figures (default: the trace's 90th percentile).
        #[arg(long, requires = "eval")]
        threshold: Option<f64>,
        /// Time N predictions of every model (the cost of one prediction) and exit.
        #[arg(long, value_name = "N", conflicts_with_all = ["eval", "values"])]
        bench: Option<u64>,
        /// The readings, oldest first; `-` reads them from stdin.
        #[arg(allow_negative_numbers = true)]
        values: Vec<String>,
        /// One JSON object on stdout instead of text (the prediction, or with --eval the
        /// whole evaluation).
        #[arg(long, conflicts_with = "bench")]
        json: bool,
    },
    /// Replay the load readings the daemon recorded (readings.csv in migration.work_dir)
    /// through other thresholds or models: the migrations each would have started, and when.
    Replay {
        #[arg(short, long, env = "STATESHIFT_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The readings file (`timestamp,value`); default: the daemon's record.
        #[arg(long)]
        readings: Option<PathBuf>,
        /// A threshold to try (repeat for several); default: monitor.threshold.
        #[arg(long, allow_negative_numbers = true)]
        threshold: Vec<f64>,
        /// The predictor to try (guarded, gm11, last, ewma); default: monitor.model.
        #[arg(long)]
        model: Option<String>,
        /// Only the readings of this last stretch of time, e.g. 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// One JSON object on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff); with --dir, write stateshift.1 and one
    /// stateshift-COMMAND.1 per command there.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Benchmark the data engine against native backup + restore.
    Bench {
        #[arg(long, default_value = "/tmp/stateshift-bench")]
        dir: PathBuf,
        #[arg(long, default_value_t = 2_000_000)]
        points: u64,
        /// Live writer rate during the migration, points/s.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Points in the separate delta-replay throughput run.
        #[arg(long, default_value_t = 1_000_000)]
        replay_points: u64,
        /// The migration's `migration.transfer_rate_limit` (e.g. 80MB/s; 0: none).
        #[arg(long, default_value = "0")]
        transfer_rate_limit: String,
        /// The migration's `migration.write_time_guard`: the source's mean write time
        /// the shard streams keep to (e.g. 5ms; 0s: off).
        #[arg(long, default_value = "0s")]
        write_time_guard: String,
        /// A cutover command that does not wait for the writer to move: the drain then
        /// ends after capture.quiet_period (2 s) rather than on the source's counters
        /// (`cutover.synchronous`, as the RCBaaS deployment's command).
        #[arg(long)]
        quiet_drain: bool,
        /// The migration's `migration.idle_nice`: the nice value of the server the
        /// writer is not using (0: both at full priority).
        #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(u8).range(0..=19))]
        idle_nice: u8,
        /// The migration's `verify.target_first`: the target's aggregates before the
        /// repoint, the source's after it (false: both at once).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        verify_target_first: bool,
        /// The migration's `verify.read_back`: the measurements nothing writes to are
        /// proven by their files, read back from the target (false: by their aggregates).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        verify_read_back: bool,
        /// The migration's `verify.read_back_on_host`: the target's shards are read back
        /// and digested on its host (false: through an SSH forward, digested here).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        verify_read_back_on_host: bool,
        /// The nice value `stateshift migrate` runs at (0-19). On a cloud it runs on the
        /// SO's VM; here it takes the cores of the writer's server.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=19))]
        orchestrator_nice: u8,
        /// Seconds the live writer runs alone before the migration starts: its latency
        /// then is the baseline, printed beside the migration's. As long as the
        /// migration, it tells the source's own stalls from the migration's.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
        alone: u64,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Load and validate FILE with its environment overrides and secret files, contacting
    /// nothing: exit 0 when the daemon would accept it, 2 with the file and key otherwise.
    Check {
        #[arg(short, long, env = "STATESHIFT_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print the effective configuration of FILE as YAML: every default, every
    /// environment override and secret file applied, every secret shown as `***`.
    Show {
        #[arg(short, long, env = "STATESHIFT_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if prints_only(&cli.cmd) {
        // Like any Unix filter, end quietly when the reader goes away (`stateshift
        // status | head`) instead of panicking on a write to a closed pipe. Only for
        // commands that change nothing: a migration must never die of its output.
        // SAFETY: no other thread exists yet, and SIG_DFL is always a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    if let Err(e) = logging::init(filter, LogStyle::detect(cli.log_format)) {
        eprintln!("stateshift: cannot set up logging: {e}");
        return ExitCode::from(1);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stateshift: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(cli.cmd))
}

/// The commands that only read and print.
fn prints_only(cmd: &Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Config { .. }
            | Cmd::Status { .. }
            | Cmd::Predict { .. }
            | Cmd::Replay { .. }
            | Cmd::Completions { .. }
            | Cmd::Man { .. }
    )
}

async fn run(cmd: Cmd) -> ExitCode {
    match cmd {
        Cmd::Config {
            cmd: ConfigCmd::Check { config },
        } => match load_config(&config) {
            Ok(cfg) => {
                println!(
                    "{}: ok (service {}, provider {:?}, monitor {:?})",
                    config.display(),
                    cfg.service.name,
                    cfg.provider.kind,
                    cfg.monitor.kind
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Config {
            cmd: ConfigCmd::Show { config },
        } => match load_config(&config) {
            Ok(cfg) => match cfg.to_yaml() {
                Ok(yaml) => {
                    println!(
                        "# {}: the effective configuration (defaults, environment and secret files applied; secrets shown as ***)\n{yaml}",
                        config.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("stateshift config show: {e}");
                    ExitCode::from(1)
                }
            },
            Err(code) => code,
        },
        Cmd::Migrate {
            config,
            yes,
            dry_run,
            report,
            json,
            timeline,
            timeline_rate,
        } => {
            if json {
                cli::human_to_stderr();
            }
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if cfg.provider.kind != stateshift::config::ProviderKind::Static && dry_run {
                let provider = match stateshift::migrate::machine::Provider::from_config(&cfg) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("stateshift: {e}");
                        return ExitCode::from(2);
                    }
                };
                println!("plan: service {} on {} -> a new stack from {} -> verify -> delete the old stack", cfg.service.name, cfg.source.influx_url, cfg.provider.template.display());
                let checked = async {
                    let mut lines =
                        stateshift::migrate::machine::preflight(&cfg, &provider).await?;
                    lines.extend(stateshift::monitor::preflight(&cfg.monitor).await?);
                    Ok::<_, String>(lines)
                };
                return print_dry_run(checked.await);
            }
            if cfg.provider.kind != stateshift::config::ProviderKind::Static && !dry_run {
                if !yes {
                    eprintln!("stateshift: refusing to migrate without --yes (or use --dry-run to check the plan)");
                    return ExitCode::from(2);
                }
                return machine_migrate(&cfg, report, json, timeline.map(|d| (d, timeline_rate)))
                    .await;
            }
            let Some(target) = cfg.target.clone() else {
                eprintln!("stateshift: {}: target: missing; provider.kind is static, so the target host must be named here", config.display());
                return ExitCode::from(2);
            };
            say!(
                "plan: migrate {} ({}) -> {} ({})",
                cfg.source.name,
                cfg.source.influx_url,
                target.name,
                target.influx_url
            );
            say!("      capture -> dump -> transfer -> restore -> delta -> cutover{} -> verify -> dispose", cfg.cutover.command.as_ref().map(|c| format!(" (`{c}`)")).unwrap_or_default());
            if dry_run {
                return print_dry_run(engine::preflight(&cfg, &target).await);
            }
            if !yes {
                eprintln!("stateshift: refusing to migrate without --yes (or use --dry-run to check the plan)");
                return ExitCode::from(2);
            }
            // Through the journaled machine too: the per-service lock, the journal and
            // crash recovery apply to a static target as to a stack.
            machine_migrate(&cfg, report, json, timeline.map(|d| (d, timeline_rate))).await
        }
        Cmd::Predict {
            window,
            min,
            model,
            eval,
            threshold,
            values,
            bench,
            json,
        } => match bench {
            Some(n) => predict_bench(window, min, n),
            None => predict(window, min, &model, eval, threshold, values, json),
        },
        Cmd::Daemon { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            let s2 = shutdown.clone();
            tokio::spawn(async move {
                wait_signal().await;
                eprintln!("stateshift: stopping at the next safe point (a running migration finishes first); signal again to exit now");
                s2.cancel();
                wait_signal().await;
                eprintln!("stateshift: exiting now; the journal lets the next start settle what was interrupted");
                std::process::exit(130);
            });
            match stateshift::daemon::run(cfg, shutdown, &engine::LogProgress, None).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("stateshift daemon: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Resolve { config, on } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match stateshift::migrate::machine::resolve(&cfg, on == "target") {
                Ok(url) => {
                    println!("recorded: service {} runs on {url}", cfg.service.name);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("stateshift resolve: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Recover { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            use stateshift::migrate::machine::{self, Provider};
            let provider = match Provider::from_config(&cfg) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("stateshift: {e}");
                    return ExitCode::from(2);
                }
            };
            match machine::recover(&cfg, &provider, &BarProgress::new()).await {
                Ok(None) => {
                    println!("nothing to settle: no migration was interrupted");
                    ExitCode::SUCCESS
                }
                Ok(Some(outcome)) => {
                    let st = machine::state(&cfg).ok();
                    let on = st
                        .as_ref()
                        .map(|st| machine::current_source(&cfg, st).influx_url)
                        .unwrap_or_default();
                    let id = st
                        .and_then(|st| st.migrations.last().map(|m| m.id.clone()))
                        .unwrap_or_default();
                    println!("{}", machine::MachineError::Settled { id, outcome, on });
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("stateshift recover: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Replay {
            config,
            readings,
            threshold,
            model,
            since,
            json,
        } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            replay(&cfg, readings, threshold, model, since, json)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "stateshift",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Cmd::Man { dir } => man_pages(dir.as_deref()),
        Cmd::Trigger { config, url } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            trigger(&cfg, url).await
        }
        Cmd::Abort {
            config,
            url,
            no_wait,
            timeout,
        } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            abort(&cfg, url, (!no_wait).then_some(timeout)).await
        }
        Cmd::Status { config, json } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match stateshift::migrate::machine::state(&cfg) {
                Ok(st) if json => {
                    let cur = stateshift::migrate::machine::current_source(&cfg, &st);
                    let unfinished = match st.recovery() {
                        stateshift::migrate::journal::Recovery::Nothing => None,
                        r => Some(format!("{r:?}")),
                    };
                    print_json(&serde_json::json!({
                        "service": cfg.service.name,
                        "influx_url": cur.influx_url,
                        "stack": cur.stack.as_ref().map(|s| s.name.clone()),
                        "unfinished": unfinished,
                        "migrations": st.migrations,
                    }))
                }
                Ok(st) => {
                    let cur = stateshift::migrate::machine::current_source(&cfg, &st);
                    println!(
                        "service {}: InfluxDB at {}{}",
                        cfg.service.name,
                        cur.influx_url,
                        cur.stack
                            .as_ref()
                            .map(|s| format!(" (stack {})", s.name))
                            .unwrap_or_default()
                    );
                    match st.recovery() {
                        stateshift::migrate::journal::Recovery::Nothing => {
                            println!("no unfinished migration")
                        }
                        r => println!("unfinished migration, settled at the next start: {r:?}"),
                    }
                    println!("migrations ({}):", st.migrations.len());
                    for m in st.migrations.iter().rev().take(20) {
                        let total: f64 = m.phases.iter().map(|p| p.1).sum();
                        let phases = m
                            .phases
                            .iter()
                            .map(|(p, s)| format!("{p} {s:.2}s"))
                            .collect::<Vec<_>>()
                            .join(", ");
                        println!(
                            "  {}  {:<11} trigger: {}  {:.1}s  [{}]{}",
                            m.id,
                            m.outcome
                                .map(|o| format!("{o:?}").to_lowercase())
                                .unwrap_or_else(|| format!(
                                    "running ({})",
                                    m.current_phase.map(|p| p.to_string()).unwrap_or_default()
                                )),
                            m.trigger,
                            total,
                            phases,
                            m.error
                                .as_ref()
                                .map(|e| format!("\n      error: {e}"))
                                .unwrap_or_default()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("stateshift status: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Demo { dir, points, serve } => {
            let r = interruptible(cli::demo::run(&dir, points, serve)).await;
            // With --serve, Ctrl-C is how the demo ends once its outcome is known.
            let r = match (r, cli::demo::SERVED.get()) {
                (Err(_), Some(o)) if serve => Ok(o.clone()),
                (r, _) => r,
            };
            match r {
                Ok(o) if o.lost == 0 && o.failed_writes == 0 && o.old_stack_gone => {
                    println!("\ndemo ok: triggered by the prediction, migrated, old stack disposed of, nothing lost");
                    ExitCode::SUCCESS
                }
                Ok(_) => {
                    eprintln!("demo: points were lost, writes failed or the old stack remains (see above)");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("stateshift demo: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Bench {
            dir,
            points,
            rate,
            replay_points,
            transfer_rate_limit,
            write_time_guard,
            quiet_drain,
            idle_nice,
            verify_target_first,
            verify_read_back,
            verify_read_back_on_host,
            orchestrator_nice,
            alone,
        } => match interruptible(bench::bench(
            &dir,
            &BenchOptions {
                points,
                rate,
                replay_points,
                transfer_rate_limit,
                write_time_guard,
                quiet_drain,
                idle_nice,
                verify_target_first,
                verify_read_back,
                verify_read_back_on_host,
                orchestrator_nice,
                alone: std::time::Duration::from_secs(alone),
            },
        ))
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stateshift bench: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

fn predict(
    window: usize,
    min: usize,
    model: &str,
    eval: Option<PathBuf>,
    threshold: Option<f64>,
    values: Vec<String>,
    json: bool,
) -> ExitCode {
    use stateshift::predict::{self, eval as ev, Model};
    if window == 0 || min == 0 || min > window {
        eprintln!("stateshift predict: --window and --min must be at least 1, with --min <= --window (got {window} and {min})");
        return ExitCode::from(2);
    }
    if let Some(path) = eval {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("stateshift predict: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        };
        return match ev::parse_trace(&text) {
            Ok(trace) => {
                let report = ev::evaluate(&trace, window, min, threshold);
                if json {
                    print_json(&report)
                } else {
                    println!(
                        "{}: {} readings, window {window}, min {min}",
                        path.display(),
                        trace.len()
                    );
                    println!("{report}");
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("stateshift predict: {}: {e}", path.display());
                ExitCode::from(2)
            }
        };
    }
    let model: Model = match model.parse() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("stateshift predict: --model: {e}");
            return ExitCode::from(2);
        }
    };
    let mut words = values;
    if words.len() == 1 && words[0] == "-" {
        let mut s = String::new();
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
            eprintln!("stateshift predict: stdin: {e}");
            return ExitCode::from(2);
        }
        words = s
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect();
    }
    let mut xs = Vec::with_capacity(words.len());
    for (i, w) in words.iter().enumerate() {
        match w.parse::<f64>() {
            Ok(v) if v.is_finite() => xs.push(v),
            _ => {
                eprintln!(
                    "stateshift predict: value {} ({w:?}) is not a finite number",
                    i + 1
                );
                return ExitCode::from(2);
            }
        }
    }
    match predict::predict_series(model, &xs, window, min) {
        Some(v) if json => print_json(&serde_json::json!({
            "model": model,
            "window": window,
            "min": min,
            "readings": xs[xs.len().saturating_sub(window)..],
            "prediction": v,
        })),
        Some(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!(
                "stateshift predict: no prediction: {} readings, at least {min} needed",
                xs.len().min(window)
            );
            ExitCode::from(1)
        }
    }
}

/// `stateshift trigger`: `POST /migrate` on the daemon's API.
/// A client of the daemon's API: its URL, and the token and certificate to reach it.
struct DaemonApi {
    url: String,
    http: reqwest::Client,
    token: stateshift::util::Secret,
}

impl DaemonApi {
    /// `cmd` names the command in errors; `Err` is the exit code (2: the configuration).
    fn new(
        cfg: &stateshift::config::Config,
        url: Option<String>,
        cmd: &str,
    ) -> Result<DaemonApi, ExitCode> {
        let Some(token) = cfg.api.token.clone() else {
            eprintln!("stateshift {cmd}: the configuration has no api.token_file (or STATESHIFT__API__TOKEN): the daemon refuses it without its token");
            return Err(ExitCode::from(2));
        };
        let url = url.unwrap_or_else(|| {
            let mut addr = cfg.api.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let scheme = if cfg.api.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{addr}")
        });
        let mut http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
        if let Some(tls) = &cfg.api.tls {
            // The daemon's own certificate is trusted (a self-signed one, as the SO VM makes).
            let cert = std::fs::read(&tls.cert_file)
                .map_err(|e| e.to_string())
                .and_then(|pem| reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string()));
            match cert {
                Ok(c) => http = http.add_root_certificate(c),
                Err(e) => {
                    eprintln!(
                        "stateshift {cmd}: api.tls_cert_file {}: {e}",
                        tls.cert_file.display()
                    );
                    return Err(ExitCode::from(2));
                }
            }
        }
        match http.build() {
            Ok(http) => Ok(DaemonApi {
                url: url.trim_end_matches('/').to_string(),
                http,
                token,
            }),
            Err(e) => {
                eprintln!("stateshift {cmd}: {e}");
                Err(ExitCode::from(1))
            }
        }
    }

    /// `POST {path}` with the token: the status and the body, or why nothing answered.
    async fn post(&self, path: &str) -> Result<(reqwest::StatusCode, String), String> {
        let at = format!("{}{path}", self.url);
        let r = self
            .http
            .post(&at)
            .bearer_auth(self.token.expose())
            .send()
            .await
            .map_err(|e| format!("POST {at}: {}", stateshift::util::error_chain(&e)))?;
        let status = r.status();
        Ok((
            status,
            r.text().await.unwrap_or_default().trim().to_string(),
        ))
    }

    /// `GET /status` as JSON.
    async fn status(&self) -> Result<serde_json::Value, String> {
        let at = format!("{}/status", self.url);
        let r = self
            .http
            .get(&at)
            .send()
            .await
            .map_err(|e| format!("GET {at}: {}", stateshift::util::error_chain(&e)))?;
        r.json()
            .await
            .map_err(|e| format!("GET {at}: {}", stateshift::util::error_chain(&e)))
    }
}

/// `stateshift trigger`: `POST /migrate` on the daemon.
async fn trigger(cfg: &stateshift::config::Config, url: Option<String>) -> ExitCode {
    let api = match DaemonApi::new(cfg, url, "trigger") {
        Ok(a) => a,
        Err(code) => return code,
    };
    match api.post("/migrate").await {
        Ok((reqwest::StatusCode::ACCEPTED, body)) => {
            println!("{}: {body}", api.url);
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("stateshift trigger: {} answered {status}: {body}", api.url);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("stateshift trigger: {e}");
            ExitCode::from(1)
        }
    }
}

/// `stateshift abort`: `POST /migrate/abort` on the daemon, then (with `wait`) follow
/// `/status` until the migration has rolled back and say how it ended.
async fn abort(
    cfg: &stateshift::config::Config,
    url: Option<String>,
    wait: Option<std::time::Duration>,
) -> ExitCode {
    let api = match DaemonApi::new(cfg, url, "abort") {
        Ok(a) => a,
        Err(code) => return code,
    };
    match api.post("/migrate/abort").await {
        Ok((reqwest::StatusCode::ACCEPTED, body)) => println!("{}: {body}", api.url),
        Ok((status, body)) => {
            eprintln!("stateshift abort: {} answered {status}: {body}", api.url);
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("stateshift abort: {e}; a `stateshift migrate` in a terminal is aborted with Ctrl-C");
            return ExitCode::from(1);
        }
    }
    let Some(wait) = wait else {
        return ExitCode::SUCCESS;
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        // Unanswered polls are retried until the deadline: the daemon is busy, not gone.
        if let Ok(st) = api.status().await {
            if st["state"] != "migrating" {
                let last = st["migrations"]
                    .as_array()
                    .and_then(|m| m.last())
                    .cloned()
                    .unwrap_or_default();
                let id = last["id"].as_str().unwrap_or("?");
                let outcome = last["outcome"].as_str().unwrap_or("unknown");
                let error = last["error"].as_str().unwrap_or("");
                let on = st["source_url"].as_str().unwrap_or("?");
                if outcome == "rolled_back" {
                    println!("migration {id} rolled back ({error}); the service runs on {on}");
                    return ExitCode::SUCCESS;
                }
                eprintln!("stateshift abort: migration {id} ended {outcome} ({error}); the service runs on {on}");
                return ExitCode::from(1);
            }
        }
        if tokio::time::Instant::now() > deadline {
            eprintln!("stateshift abort: the rollback did not end within {wait:?} (--timeout); follow it with `stateshift status`");
            return ExitCode::from(1);
        }
    }
}

/// `stateshift replay`: the recorded readings through other settings.
fn replay(
    cfg: &stateshift::config::Config,
    readings: Option<PathBuf>,
    thresholds: Vec<f64>,
    model: Option<String>,
    since: Option<std::time::Duration>,
    json: bool,
) -> ExitCode {
    use stateshift::predict::{policy::PolicyConfig, replay as rp, Model};
    let path = readings.unwrap_or_else(|| stateshift::daemon::readings_file(cfg));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("stateshift replay: {}: {e} (the daemon records its readings there once it has read the load)", path.display());
            return ExitCode::from(2);
        }
    };
    let mut all = match rp::parse(&text) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stateshift replay: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    if let (Some(since), Some(last)) = (since, all.last().map(|r| r.at)) {
        let from = last.checked_sub(since).unwrap_or(std::time::UNIX_EPOCH);
        all.retain(|r| r.at >= from);
    }
    let model: Model = match model.map(|m| m.parse()).transpose() {
        Ok(m) => m.unwrap_or(cfg.monitor.model),
        Err(e) => {
            eprintln!("stateshift replay: --model: {e}");
            return ExitCode::from(2);
        }
    };
    let thresholds = if thresholds.is_empty() {
        vec![cfg.monitor.threshold]
    } else {
        thresholds
    };
    let m = &cfg.monitor;
    let mut runs = Vec::new();
    for t in thresholds {
        let pc = PolicyConfig {
            threshold: t,
            min_readings: m.min_readings,
            window: m.window,
            cooldown: m.cooldown,
            consecutive: m.consecutive as usize,
            model,
        };
        match rp::replay(&all, pc) {
            Ok(w) => runs.push((t, w)),
            Err(e) => {
                eprintln!("stateshift replay: threshold {t}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let stamp = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if json {
        return print_json(&serde_json::json!({
            "readings": path,
            "count": all.len(),
            "from": all.first().map(|r| stamp(r.at)),
            "to": all.last().map(|r| stamp(r.at)),
            "model": model,
            "window": m.window,
            "min_readings": m.min_readings,
            "consecutive": m.consecutive,
            "cooldown": humantime::format_duration(m.cooldown).to_string(),
            "runs": runs.iter().map(|(t, w)| serde_json::json!({
                "threshold": t,
                "migrations": w.iter().map(|x| serde_json::json!({
                    "at": stamp(x.at), "prediction": x.prediction,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }));
    }
    match (all.first(), all.last()) {
        (Some(a), Some(b)) => println!(
            "{}: {} readings from {} to {}",
            path.display(),
            all.len(),
            stamp(a.at),
            stamp(b.at)
        ),
        _ => println!("{}: no readings", path.display()),
    }
    for (t, w) in &runs {
        let head = format!(
            "threshold {t} (model {model}, window {}, min {}, {} in a row, cooldown {})",
            m.window,
            m.min_readings,
            m.consecutive,
            humantime::format_duration(m.cooldown)
        );
        match w.len() {
            0 => println!("{head}: no migration would have started"),
            n => {
                println!(
                    "{head}: {n} migration{} would have started",
                    if n == 1 { "" } else { "s" }
                );
                for x in w {
                    println!("  {}  prediction {:.2}", stamp(x.at), x.prediction);
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// `stateshift man`: the manual page on stdout, or every page into `dir`.
fn man_pages(dir: Option<&std::path::Path>) -> ExitCode {
    let cmd = <Cli as clap::CommandFactory>::command();
    let Some(dir) = dir else {
        return match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stateshift man: {e}");
                ExitCode::from(1)
            }
        };
    };
    let write = |name: &str, page: clap::Command| -> std::io::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out)
    };
    let mut r = std::fs::create_dir_all(dir).and_then(|()| write("stateshift", cmd.clone()));
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("stateshift-{}", sub.get_name());
        r = r.and_then(|()| {
            write(
                &name,
                sub.clone()
                    .display_name(name.clone())
                    .bin_name(name.clone()),
            )
        });
    }
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stateshift man: {}: {e}", dir.display());
            ExitCode::from(1)
        }
    }
}

/// `value` as pretty JSON on stdout.
fn print_json(value: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stateshift: cannot write JSON: {e}");
            ExitCode::from(1)
        }
    }
}

/// Run `fut` until it ends or SIGINT/SIGTERM arrives; on a signal the future is dropped,
/// which stops the local servers it started (their processes are killed on drop).
async fn interruptible<T>(
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = fut => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; the local servers were stopped")),
        _ = term => Err(anyhow::anyhow!("terminated; the local servers were stopped")),
    }
}

/// The cost of one prediction per model: a stateful predictor (as the daemon keeps one)
/// fed a deterministic load series, `n` predictions, wall time per prediction.
fn predict_bench(window: usize, min: usize, n: u64) -> ExitCode {
    use stateshift::predict::{Model, Predictor};
    let n = n.max(1);
    // A load that wanders and bursts, so every guard path is taken.
    let series: Vec<f64> = (0..1024u64)
        .map(|i| {
            5.0 + 4.0 * ((i as f64) * 0.07).sin()
                + if i % 97 < 6 { 20.0 } else { 0.0 }
                + (i % 7) as f64 * 0.1
        })
        .collect();
    println!("model     ns/prediction  ({n} predictions, window {window}, min {min})");
    for model in Model::ALL {
        let mut p = Predictor::new(model);
        let mut sink = 0.0;
        let t = std::time::Instant::now();
        for i in 0..n {
            let end = (i as usize % (series.len() - window)) + window;
            let w = &series[end - window..end];
            if let Some(v) = p.predict(std::hint::black_box(w), min) {
                sink += v;
            }
            p.observe(series[end]);
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        std::hint::black_box(sink);
        println!("{:<9} {ns:>13.1}", model.name());
    }
    ExitCode::SUCCESS
}

/// `stateshift migrate` with a stack provider: the journaled machine.
async fn machine_migrate(
    cfg: &Config,
    report: Option<PathBuf>,
    json: bool,
    timeline: Option<(PathBuf, u32)>,
) -> ExitCode {
    use stateshift::migrate::machine::{self, Provider};
    use stateshift::timeline::probe::{self, JournalFollow, ProbeSpec, RunningProbe};
    let provider = match Provider::from_config(cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("stateshift: {e}");
            return ExitCode::from(2);
        }
    };
    // The service's lock, held from here to the end of the migration: the probe starts
    // (and its database exists) before the migration does, and writing a new database
    // into a source that another migration is moving (or that waits for an operator)
    // would break that one.
    let held = match machine::lock(&machine::Paths::of(cfg).lock) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("stateshift: migration failed: {e}; nothing was probed or migrated");
            if json {
                println!("{}", not_started(&e.to_string()));
            }
            if let Some(path) = &report {
                let json = serde_json::json!({"error": e.to_string(), "phase": null});
                if let Err(w) = std::fs::write(path, json.to_string()) {
                    eprintln!("stateshift: cannot write report {}: {w}", path.display());
                }
            }
            return ExitCode::from(1);
        }
    };
    if timeline.is_some() {
        let blocked = match machine::state(cfg) {
            Err(e) => Some(e.to_string()),
            Ok(st) => st.needs_operator().map(|m| {
                format!(
                    "migration {} failed after cutover and waits for `stateshift resolve`",
                    m.id
                )
            }),
        };
        if let Some(why) = blocked {
            eprintln!("stateshift: {why}; nothing was probed or migrated");
            if json {
                println!("{}", not_started(&why));
            }
            return ExitCode::from(1);
        }
    }
    let probe = match &timeline {
        None => None,
        Some((dir, rate)) => {
            let spec = ProbeSpec {
                rate: *rate,
                ..ProbeSpec::default()
            };
            let started = match JournalFollow::new(cfg) {
                Ok(f) => RunningProbe::start(spec, f).await,
                Err(e) => Err(e),
            };
            match started {
                Ok(p) => {
                    // A baseline before anything changes.
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    Some((p, dir.clone()))
                }
                Err(e) => {
                    eprintln!(
                        "stateshift: --timeline {}: {e}; nothing was migrated",
                        dir.display()
                    );
                    return ExitCode::from(1);
                }
            }
        }
    };
    // SIGINT/SIGTERM (Ctrl-C) aborts the migration: before its cutover it rolls back,
    // past it the abort is refused and the migration goes on. A second signal exits at
    // once (the journal lets the next run settle what was interrupted).
    let abort = stateshift::migrate::abort::Abort::new();
    let _on_signal = tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
        let abort = abort.clone();
        async move {
            wait_signal().await;
            match abort.request("an operator (a signal to stateshift migrate)") {
                Ok(()) => eprintln!(
                    "stateshift: aborting: rolling back (a second Ctrl-C exits at once; the next run settles what is left)"
                ),
                Err(refused) => eprintln!("stateshift: not aborted: {refused}"),
            }
            wait_signal().await;
            eprintln!(
                "stateshift: interrupted; the next run settles this migration from its journal"
            );
            std::process::exit(130);
        }
    }));
    let r = machine::migrate_holding(
        &held,
        cfg,
        &provider,
        "manual: stateshift migrate",
        &BarProgress::new(),
        &abort,
    )
    .await;
    drop(held);
    let (code, report_json) = match &r {
        Ok(rep) => {
            bench::print_report(rep);
            say!(
                "migration {} succeeded: verified, old stack disposed of",
                rep.migration_id
            );
            for line in stateshift::daemon::retire_monitor_hosts(cfg).await {
                say!("{line}");
            }
            (ExitCode::SUCCESS, serde_json::to_string_pretty(rep))
        }
        // Settling was the whole of this run: say what it did.
        Err(
            e @ machine::MachineError::Settled {
                outcome: stateshift::migrate::journal::Outcome::Succeeded,
                ..
            },
        ) => {
            say!("{e}");
            (
                ExitCode::SUCCESS,
                serde_json::to_string_pretty(&serde_json::json!({"settled": e.to_string()})),
            )
        }
        Err(e @ machine::MachineError::Settled { .. }) => {
            eprintln!("stateshift: {e}");
            (
                ExitCode::from(1),
                serde_json::to_string_pretty(
                    &serde_json::json!({"error": e.to_string(), "phase": null}),
                ),
            )
        }
        Err(e) => {
            eprintln!("stateshift: migration failed: {e}");
            (
                ExitCode::from(1),
                serde_json::to_string_pretty(
                    &serde_json::json!({"error": e.to_string(), "phase": e.phase()}),
                ),
            )
        }
    };
    let mut summary = json.then(|| migrate_json(cfg, &r));
    // The report first: a timeline that cannot be written must not lose it.
    if let (Some(path), Ok(text)) = (report, report_json) {
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("stateshift: cannot write report {}: {e}", path.display());
            if let Some(s) = &summary {
                println!("{s}");
            }
            return ExitCode::from(1);
        }
    }
    if let Some((p, dir)) = probe {
        // A few seconds on the service's new home, to show it settled.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let title = format!(
            "stateshift: availability of service {} during migration ({} writes+reads/s)",
            cfg.service.name, p.rate
        );
        match probe::finish_into(p, cfg, &dir, &title).await {
            Ok((csv, svg, said)) => {
                say!("availability: {said}");
                say!("availability timeline: {}", csv.display());
                say!("availability timeline: {}", svg.display());
                if let Some(s) = summary.as_mut() {
                    s["availability"] = serde_json::json!({
                        "summary": said.to_string(),
                        "csv": csv,
                        "svg": svg,
                    });
                }
            }
            // The migration's outcome stands; the chart is only a view of it.
            Err(e) => eprintln!("stateshift: the availability timeline was not written: {e}"),
        }
    }
    if let Some(s) = summary {
        println!("{s}");
    }
    code
}

/// `migrate --json` when nothing started.
fn not_started(error: &str) -> serde_json::Value {
    serde_json::json!({
        "ok": false,
        "outcome": "not_started",
        "error": error,
        "phase": null,
    })
}

/// `migrate --json`: how the run ended, as one object. `outcome` is `succeeded`,
/// `rolled_back` (the service stays where it ran, nothing lost; `aborted_by` says who
/// when an operator aborted), `failed` (past the cutover: nothing was deleted, see
/// `error`), `settled` (an interrupted migration was settled instead: `settled` says
/// how) or `not_started`; `service_runs_on` is where the journal says the service runs
/// now.
fn migrate_json(
    cfg: &Config,
    r: &Result<engine::Report, stateshift::migrate::machine::MachineError>,
) -> serde_json::Value {
    use stateshift::migrate::machine::{self, MachineError};
    let runs_on = machine::state(cfg)
        .ok()
        .map(|st| machine::current_source(cfg, &st).influx_url);
    let (outcome, settled) = match r {
        Ok(_) => ("succeeded", None),
        Err(MachineError::Settled { outcome, .. }) => ("settled", Some(*outcome)),
        Err(MachineError::RolledBack { .. } | MachineError::Stack(_)) => ("rolled_back", None),
        Err(
            MachineError::AfterCutover { .. }
            | MachineError::LateWrites { .. }
            | MachineError::Dispose { .. },
        ) => ("failed", None),
        Err(_) => ("not_started", None),
    };
    let (error, phase, aborted_by) = match r {
        Ok(_) => (None, None, None),
        Err(e) => (Some(e.to_string()), e.phase(), e.aborted_by()),
    };
    serde_json::json!({
        "ok": r.is_ok()
            || settled == Some(stateshift::migrate::journal::Outcome::Succeeded),
        "outcome": outcome,
        "settled": settled,
        "error": error,
        "phase": phase,
        "aborted_by": aborted_by,
        "service_runs_on": runs_on,
        "report": r.as_ref().ok(),
    })
}

async fn wait_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Migration progress for a person: a spinner per phase on a terminal, plain lines
/// otherwise (CI, logs, pipes).
struct BarProgress {
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
    tty: bool,
}

impl BarProgress {
    fn new() -> BarProgress {
        use std::io::IsTerminal;
        BarProgress {
            bar: std::sync::Mutex::new(None),
            // The spinner draws on stderr; the lines go where `say!` sends them.
            tty: if cli::humans_on_stderr() {
                std::io::stderr().is_terminal()
            } else {
                std::io::stdout().is_terminal()
            },
        }
    }
}

impl engine::Progress for BarProgress {
    fn phase_started(&self, phase: engine::Phase) {
        if !self.tty {
            return PrintProgress.phase_started(phase);
        }
        let b = indicatif::ProgressBar::new_spinner();
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("  {spinner} {msg} {elapsed_precise}")
        {
            b.set_style(style);
        }
        b.set_message(phase.to_string());
        b.enable_steady_tick(std::time::Duration::from_millis(100));
        *self.bar.lock().unwrap_or_else(|p| p.into_inner()) = Some(b);
    }
    fn phase_done(&self, phase: engine::Phase, took: std::time::Duration) {
        match self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(b) => {
                b.finish_with_message(format!("{phase} done in {:.3} s", took.as_secs_f64()))
            }
            None => PrintProgress.phase_done(phase, took),
        }
    }
    fn note(&self, msg: &str) {
        match self.bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(b) => b.println(format!("     {msg}")),
            None => PrintProgress.note(msg),
        }
    }
}

/// What a dry run checked, or what stopped it (exit 1).
fn print_dry_run<E: std::fmt::Display>(checked: Result<Vec<String>, E>) -> ExitCode {
    match checked {
        Ok(lines) => {
            for l in lines {
                println!("  ok  {l}");
            }
            println!("dry run: every dependency answered; nothing was changed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stateshift: dry run: {e}");
            ExitCode::from(1)
        }
    }
}

/// The configuration, or the exit code of a configuration error (2) after saying why.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("stateshift: {e}");
        ExitCode::from(2)
    })
}
