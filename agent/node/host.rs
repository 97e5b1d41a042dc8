//! HostProbe: samples the host (CPU, memory, the disks holding the node's
//! and Outpost's data), the node's process and Outpost's own, every
//! `host.interval`, and hands each sample to Validate, which judges the
//! thresholds.

use std::path::{Path, PathBuf};

use actix::prelude::*;
use sysinfo::{Disks, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use super::judge::Input;
use super::validate::{Observation, Validate};
use super::Ping;
use crate::config::HostConfig;
use crate::proto::HostSample;

pub struct HostProbe {
    cfg: HostConfig,
    /// Outpost's own data dir.
    data_dir: PathBuf,
    validate: Addr<Validate>,
    /// None when this system cannot be read; the probe then does nothing.
    sys: Option<System>,
    me: Option<Pid>,
    span: tracing::Span,
    schedule: Option<SpawnHandle>,
}

impl HostProbe {
    pub fn new(
        cfg: HostConfig,
        data_dir: PathBuf,
        validate: Addr<Validate>,
        span: tracing::Span,
    ) -> HostProbe {
        HostProbe {
            cfg,
            data_dir,
            validate,
            sys: System::new()
                .map_err(|e| {
                    let _g = span.enter();
                    tracing::error!("host probe off: cannot read this system: {e}");
                })
                .ok(),
            me: sysinfo::get_current_pid().ok(),
            span,
            schedule: None,
        }
    }

    fn reschedule(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.schedule.take() {
            ctx.cancel_future(h);
        }
        if !self.cfg.interval.is_zero() {
            self.schedule = Some(ctx.run_interval(self.cfg.interval, |act, _| {
                if let Some(sample) = act.sample() {
                    act.validate.do_send(Observation(Input::Host(sample)));
                }
            }));
        }
    }

    pub fn sample(&mut self) -> Option<HostSample> {
        let _g = self.span.enter();
        let sys = self.sys.as_mut()?;
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        let procs = ProcessRefreshKind::nothing().with_cpu().with_memory();
        if self.cfg.node_process.is_some() && self.cfg.node_pid_file.is_none() {
            sys.refresh_processes_specifics(ProcessesToUpdate::All, true, procs);
        }
        let node = node_pid(&self.cfg, sys);
        let pids: Vec<Pid> = self.me.into_iter().chain(node).collect();
        sys.refresh_processes_specifics(ProcessesToUpdate::Some(&pids), true, procs);
        let mut sample = HostSample {
            cpu_percent: sys.global_cpu_usage(),
            // A host whose memory cannot be read (total 0) reports 0, not
            // 100 %: no memory finding from a reading that is not there.
            memory_percent: used_percent(sys.total_memory(), sys.available_memory())
                .unwrap_or_default(),
            ..Default::default()
        };
        if let Some(p) = self.me.and_then(|pid| sys.process(pid)) {
            sample.outpost_cpu_percent = p.cpu_usage();
            sample.outpost_rss_bytes = p.memory();
        }
        if let Some(p) = node.and_then(|pid| sys.process(pid)) {
            sample.node_cpu_percent = Some(p.cpu_usage());
            sample.node_rss_bytes = Some(p.memory());
        }
        match Disks::new_with_refreshed_list() {
            Ok(disks) => {
                let dirs = std::iter::once(self.data_dir.as_path())
                    .chain(self.cfg.node_data_dir.as_deref());
                for dir in dirs {
                    if let Some(pct) = disk_use(&disks, dir) {
                        if pct >= sample.disk_percent {
                            sample.disk_percent = pct;
                            sample.disk_path = dir.display().to_string();
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("cannot list the disks: {e}"),
        }
        Some(sample)
    }
}

/// The node's pid: from its pid file, else the first process with its name.
fn node_pid(cfg: &HostConfig, sys: &System) -> Option<Pid> {
    if let Some(file) = &cfg.node_pid_file {
        let text = std::fs::read_to_string(file).ok()?;
        return text.trim().parse::<usize>().ok().map(Pid::from);
    }
    let name = cfg.node_process.as_deref()?;
    sys.processes_by_exact_name(name.as_ref())
        .next()
        .map(|p| p.pid())
}

/// Percent of `total` not `available`; None when `total` is 0.
fn used_percent(total: u64, available: u64) -> Option<f32> {
    (total > 0).then(|| (total - available.min(total)) as f32 * 100.0 / total as f32)
}

/// Percent used of the filesystem holding `dir` (the mount point that is
/// its longest prefix).
fn disk_use(disks: &Disks, dir: &Path) -> Option<f32> {
    let dir = dir.canonicalize().ok()?;
    let disk = disks
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())?;
    used_percent(disk.total_space(), disk.available_space())
}

impl Actor for HostProbe {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // CPU use is a difference between two reads: take the first now.
        if let Some(sys) = &mut self.sys {
            sys.refresh_cpu_usage();
        }
        self.reschedule(ctx);
    }
}

impl Supervised for HostProbe {}

impl Handler<Ping> for HostProbe {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

/// A reloaded `[host]` table: interval, paths and thresholds apply live.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconfigure(pub HostConfig);

impl Handler<Reconfigure> for HostProbe {
    type Result = ();
    fn handle(&mut self, msg: Reconfigure, ctx: &mut Context<Self>) {
        let retime = msg.0.interval != self.cfg.interval;
        self.cfg = msg.0;
        if retime {
            self.reschedule(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::used_percent;

    #[test]
    fn percent_used_needs_a_total() {
        assert_eq!(used_percent(200, 50), Some(75.0));
        assert_eq!(
            used_percent(200, 500),
            Some(0.0),
            "more available than total"
        );
        assert_eq!(
            used_percent(0, 0),
            None,
            "an unreadable total is no reading"
        );
    }
}
