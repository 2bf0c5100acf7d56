//! Capacity search: run step after step with a growing offered rate (or client count)
//! until the latency objective or the verification fails; report the largest load that met
//! it, with every step's full report.

use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::run::{RunOutcome, run, write_file};
use crate::spec::RunArgs;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Dimension {
    Rate,
    Clients,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum SloMetric {
    Ack,
    E2e,
}

#[derive(Debug, Clone, Args)]
pub struct CapacityArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The objective: p99 of --slo-metric at or below this many milliseconds.
    #[arg(long)]
    pub slo_p99_ms: f64,
    #[arg(long, value_enum, default_value_t = SloMetric::E2e)]
    pub slo_metric: SloMetric,
    /// What grows from step to step: the offered --rate, or --clients.
    #[arg(long, value_enum, default_value_t = Dimension::Rate)]
    pub dimension: Dimension,
    /// Load of the first step (default: --rate or --clients as given).
    #[arg(long)]
    pub start: Option<f64>,
    /// Each step multiplies the load by this.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// After the first miss, halve the gap between the last met and the missed load this
    /// many times.
    #[arg(long, default_value_t = 2)]
    pub refine: u32,
    #[arg(long, default_value_t = 12)]
    pub max_steps: u32,
    /// A step must have acknowledged at least this fraction of the offered rate.
    #[arg(long, default_value_t = 0.95)]
    pub min_acked_fraction: f64,
}

/// Runs the search; returns the report and whether any step met the objective.
pub fn capacity(args: &CapacityArgs) -> Result<(Value, bool), String> {
    if args.factor.is_nan() || args.factor <= 1.0 {
        return Err("--factor must be above 1".into());
    }
    if args.slo_p99_ms.is_nan() || args.slo_p99_ms <= 0.0 {
        return Err("--slo-p99-ms must be positive".into());
    }
    let initial = args.start.unwrap_or(match args.dimension {
        Dimension::Rate => args.run.rate,
        Dimension::Clients => f64::from(args.run.clients),
    });
    if initial.is_nan() || initial <= 0.0 {
        return Err("the first step needs a positive load (--start)".into());
    }
    let mut steps = Vec::new();
    let mut best: Option<f64> = None;
    let mut missed: Option<f64> = None;
    let mut load = initial;
    let mut refinements = 0;
    for _ in 0..args.max_steps {
        let (met, why, report) = step(args, load)?;
        eprintln!(
            "tern-loadgen capacity: load {load:.0}: {}",
            if met {
                "met".to_owned()
            } else {
                format!("missed ({why})")
            }
        );
        steps.push(json!({ "load": load, "met": met, "why": why, "report": report }));
        if met {
            best = Some(best.map_or(load, |b| b.max(load)));
        } else {
            missed = Some(missed.map_or(load, |m| m.min(load)));
        }
        load = match (best, missed) {
            (_, None) => load * args.factor,
            (Some(lo), Some(hi)) if refinements < args.refine && hi - lo > 1.0 => {
                refinements += 1;
                ((lo + hi) / 2.0).round()
            }
            _ => break,
        };
        if missed.is_some() && best.is_none() {
            break;
        }
    }
    let report = json!({
        "dimension": match args.dimension { Dimension::Rate => "rate", Dimension::Clients => "clients" },
        "slo_metric": match args.slo_metric { SloMetric::Ack => "ack", SloMetric::E2e => "e2e" },
        "slo_p99_ms": args.slo_p99_ms,
        "best": best,
        "first_missed": missed,
        "steps": steps,
    });
    if let Some(path) = &args.run.report {
        write_file(path, &serde_json::to_string_pretty(&report).expect("json"))?;
    }
    if let Some(path) = &args.run.html {
        write_file(path, &crate::html::capacity_page(&report))?;
    }
    Ok((report, best.is_some()))
}

fn step(args: &CapacityArgs, load: f64) -> Result<(bool, String, Value), String> {
    let mut run_args = args.run.clone();
    run_args.report = None;
    run_args.html = None;
    match args.dimension {
        Dimension::Rate => run_args.rate = load,
        Dimension::Clients => run_args.clients = load.round().max(1.0) as u32,
    }
    let RunOutcome { report, passed, .. } = run(&run_args)?;
    let metric = match args.slo_metric {
        SloMetric::Ack => "ack",
        SloMetric::E2e => "e2e",
    };
    let p99 = report["latency_ms"][metric]["p99"]
        .as_f64()
        .unwrap_or(f64::INFINITY);
    let acked_rate = report["messages"]["acked_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    let clients_failed = report["clients"]["failed"].as_u64().unwrap_or(0);
    let why = if !passed {
        "verification or run failed".to_owned()
    } else if p99 > args.slo_p99_ms {
        format!("{metric} p99 {p99:.1} ms > {} ms", args.slo_p99_ms)
    } else if run_args.rate > 0.0
        && run_args.window.is_none()
        && acked_rate < args.min_acked_fraction * run_args.rate
    {
        format!("acked {acked_rate:.0}/s of {:.0}/s offered", run_args.rate)
    } else if clients_failed > 0 {
        format!("{clients_failed} clients never connected")
    } else {
        String::new()
    };
    Ok((why.is_empty(), why, report))
}
