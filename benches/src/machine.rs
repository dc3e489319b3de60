//! What machine a run was on, for the report: CPU, cores, memory, kernel, load, date.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The machine and the moment of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model name from `/proc/cpuinfo`.
    pub cpu: String,
    /// Cores this process may use.
    pub cores: usize,
    /// Memory in GiB from `/proc/meminfo`.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// 1, 5 and 15 minute load averages when the run started.
    pub load_at_start: [f64; 3],
    /// The same when it ended.
    pub load_at_end: [f64; 3],
    /// When the run started, `YYYY-MM-DD HH:MM UTC`.
    pub date_utc: String,
}

impl Machine {
    /// The machine now.
    pub fn now() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown CPU".to_string(), |(_, m)| m.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
            |_| std::env::consts::OS.to_string(),
            |k| k.trim().to_string(),
        );
        let load = load_average();
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: memory_kib / (1 << 20) as f64,
            kernel,
            load_at_start: load,
            load_at_end: load,
            date_utc: date_utc(SystemTime::now()),
        }
    }

    /// Records the load average at the end of the run.
    pub fn finish(&mut self) {
        self.load_at_end = load_average();
    }

    /// One line: `2 × AMD EPYC ..., 23 GiB, Linux 6.18, load 0.43 → 1.20`.
    pub fn describe(&self) -> String {
        format!(
            "{} × {}, {:.0} GiB, Linux {}, load (1 min) {:.2} at start, {:.2} at end",
            self.cores,
            self.cpu,
            self.memory_gib,
            self.kernel,
            self.load_at_start[0],
            self.load_at_end[0]
        )
    }
}

fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
    [(); 3].map(|()| fields.next().unwrap_or(0.0))
}

/// `YYYY-MM-DD HH:MM UTC` of a time.
fn date_utc(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3_600,
        rem % 3_600 / 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        let at = |secs| date_utc(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01 00:00 UTC");
        assert_eq!(at(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(at(1_767_225_600 + 3_600 + 120), "2026-01-01 01:02 UTC");
    }
}
