//! Memory limits for command jobs' ranks: `memory_mib_per_shard` held by the
//! kernel's memory controller, one cgroup per rank under the worker's own.
//!
//! At start the worker finds its own cgroup (`/proc/self/cgroup`) in the
//! memory hierarchy (`/proc/self/mountinfo`): cgroup v1's `memory` controller
//! or cgroup v2 with `memory` among its controllers, and makes
//! `kiln-<worker>` under it. Where it cannot (no memory controller, a
//! read-only cgroup filesystem, v2 without a delegated subtree), limits are not
//! enforced: the worker logs why, `kiln status` shows it for the worker
//! (`Resources.memory_limits`), and a rank that asks for a limit there runs
//! without one and says so in its job's log.
//!
//! A rank joins its cgroup between fork and exec (it writes `0`, itself, to
//! the cgroup's `cgroup.procs`), so everything it starts is held too. When
//! the kernel's OOM killer ends a rank, its reason says so.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How a worker holds ranks to their memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLimits {
    /// cgroup v1's memory controller; ranks' cgroups go under `base`.
    V1 { base: PathBuf },
    /// cgroup v2; ranks' cgroups go under `base`.
    V2 { base: PathBuf },
    /// Not enforced, and why.
    Unenforced(String),
}

/// Removes the `kiln-*` cgroups under `dir` that hold nothing (workers that
/// were killed leave theirs): the kernel removes only empty ones, and a live
/// worker's is made again when its next rank needs it.
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("kiln-") {
            if let Ok(children) = std::fs::read_dir(entry.path()) {
                for child in children.flatten() {
                    if child.path().is_dir() {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// A cgroup line of `/proc/self/cgroup`: hierarchy controllers and path.
fn own_cgroups(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some((
                controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path.to_string(),
            ))
        })
        .collect()
}

/// A cgroup mount of `/proc/self/mountinfo`: its root within the hierarchy,
/// its mount point, its type and super options.
struct Mount {
    root: String,
    point: PathBuf,
    v2: bool,
    options: Vec<String>,
}

fn cgroup_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split_whitespace().collect();
            let mut right = right.split_whitespace();
            let fstype = right.next()?;
            let _source = right.next()?;
            let options = right.next().unwrap_or_default();
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some(Mount {
                root: fields.get(3)?.to_string(),
                point: PathBuf::from(fields.get(4)?),
                v2: fstype == "cgroup2",
                options: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// The directory of cgroup `path` in a hierarchy mounted with `mount`.
fn directory(mount: &Mount, path: &str) -> PathBuf {
    let inside = path
        .strip_prefix(mount.root.as_str())
        .unwrap_or(path)
        .trim_start_matches('/');
    mount.point.join(inside)
}

impl MemoryLimits {
    /// Finds how this worker can hold ranks to their memory, and makes its
    /// own cgroup for them (`kiln-<worker>`).
    pub fn detect(worker_id: &str) -> MemoryLimits {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Self::detect_in(&own, &mounts, worker_id)
    }

    fn detect_in(own: &str, mounts: &str, worker_id: &str) -> MemoryLimits {
        let own = own_cgroups(own);
        let mounts = cgroup_mounts(mounts);
        let name = format!("kiln-{}", &worker_id[..worker_id.len().min(12)]);
        // cgroup v1's memory controller.
        let v1 = own
            .iter()
            .find(|(controllers, _)| controllers.iter().any(|c| c == "memory"));
        let v1_mount = mounts
            .iter()
            .find(|m| !m.v2 && m.options.iter().any(|o| o == "memory"));
        if let (Some((_, path)), Some(mount)) = (v1, v1_mount) {
            sweep(&directory(mount, path));
            let base = directory(mount, path).join(&name);
            return match std::fs::create_dir_all(&base) {
                Ok(()) => MemoryLimits::V1 { base },
                Err(e) => MemoryLimits::Unenforced(format!(
                    "cgroup v1: cannot make {}: {e}",
                    base.display()
                )),
            };
        }
        // cgroup v2: the memory controller must be enabled for the worker's
        // own subtree, which needs a cgroup of its own (systemd's
        // Delegate=yes) since a cgroup with processes cannot hand controllers
        // down.
        let v2 = own.iter().find(|(controllers, _)| controllers.is_empty());
        let v2_mount = mounts.iter().find(|m| m.v2);
        if let (Some((_, path)), Some(mount)) = (v2, v2_mount) {
            let own_dir = directory(mount, path);
            let controllers =
                std::fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
            if !controllers.split_whitespace().any(|c| c == "memory") {
                return MemoryLimits::Unenforced(format!(
                    "cgroup v2: the memory controller is not available in {}",
                    own_dir.display()
                ));
            }
            sweep(&own_dir);
            let base = own_dir.join(&name);
            let made = std::fs::write(own_dir.join("cgroup.subtree_control"), "+memory")
                .and_then(|()| std::fs::create_dir_all(&base))
                .and_then(|()| std::fs::write(base.join("cgroup.subtree_control"), "+memory"));
            return match made {
                Ok(()) => MemoryLimits::V2 { base },
                Err(e) => MemoryLimits::Unenforced(format!(
                    "cgroup v2: cannot enable the memory controller under {}: {e} (run the worker in a delegated cgroup, e.g. systemd's Delegate=yes)",
                    own_dir.display()
                )),
            };
        }
        MemoryLimits::Unenforced("no cgroup memory controller is mounted".into())
    }

    /// In words, for the worker's log and `kiln status`.
    pub fn describe(&self) -> String {
        match self {
            MemoryLimits::V1 { base } => format!("enforced (cgroup v1, {})", base.display()),
            MemoryLimits::V2 { base } => format!("enforced (cgroup v2, {})", base.display()),
            MemoryLimits::Unenforced(why) => format!("not enforced: {why}"),
        }
    }

    /// A cgroup of `mib` MiB for rank `name`; `Ok(None)` when limits are not
    /// enforced here.
    pub fn for_rank(&self, name: &str, mib: u64) -> Result<Option<RankCgroup>, String> {
        let (base, v2) = match self {
            MemoryLimits::V1 { base } => (base, false),
            MemoryLimits::V2 { base } => (base, true),
            MemoryLimits::Unenforced(_) => return Ok(None),
        };
        let dir = base.join(name);
        // A cgroup left by an earlier life of the worker: empty by now.
        let _ = std::fs::remove_dir(&dir);
        if !base.exists() {
            // Swept by another worker's start: made again.
            std::fs::create_dir_all(base).map_err(|e| format!("make {}: {e}", base.display()))?;
            if v2 {
                let _ = std::fs::write(base.join("cgroup.subtree_control"), "+memory");
            }
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("make {}: {e}", dir.display()))?;
        let bytes = (mib << 20).to_string();
        let limit = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(dir.join(limit), &bytes)
            .map_err(|e| format!("write {}: {e}", dir.join(limit).display()))?;
        // No escape into swap.
        let swap = if v2 {
            "memory.swap.max"
        } else {
            "memory.memsw.limit_in_bytes"
        };
        if dir.join(swap).exists() {
            let _ = std::fs::write(dir.join(swap), if v2 { "0" } else { bytes.as_str() });
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{} holds a NUL byte", dir.display()))?;
        Ok(Some(RankCgroup { dir, procs, v2 }))
    }
}

/// One rank's cgroup, removed when dropped (once its processes are gone).
#[derive(Debug)]
pub struct RankCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, ready for the child to write itself into before exec.
    procs: CString,
    v2: bool,
}

impl RankCgroup {
    /// The path of `cgroup.procs`, as the child writes it between fork and exec.
    pub fn procs(&self) -> &CString {
        &self.procs
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the kernel's OOM killer killed a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let counted = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .any(|(k, v)| k == key && v.trim().parse::<u64>().is_ok_and(|n| n > 0));
        // Older v1 kernels have no oom_kill count: a hit limit is the sign.
        counted
            || (!self.v2
                && std::fs::read_to_string(self.dir.join("memory.failcnt"))
                    .ok()
                    .and_then(|t| t.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
                && !text.contains("oom_kill "))
    }
}

impl Drop for RankCgroup {
    fn drop(&mut self) {
        // The kernel refuses while a process remains or is being uncharged.
        for _ in 0..20 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        tracing::warn!(dir = %self.dir.display(), "a rank's cgroup could not be removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workers_own_memory_cgroup_is_found_in_v1_and_v2_layouts() {
        let own = "4:memory:/process_api/abc\n3:cpuset:/\n0::/\n";
        let mounts = "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                      31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        let mounted = cgroup_mounts(mounts);
        let v1 = mounted
            .iter()
            .find(|m| m.options.iter().any(|o| o == "memory"));
        let mount = v1.expect("the memory mount");
        assert_eq!(
            directory(mount, "/process_api/abc"),
            Path::new("/sys/fs/cgroup/memory/process_api/abc")
        );
        // A container whose hierarchy root is its own cgroup.
        let nested = "40 25 0:26 /docker/xyz /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n";
        let nested = cgroup_mounts(nested);
        assert_eq!(
            directory(&nested[0], "/docker/xyz"),
            Path::new("/sys/fs/cgroup/memory")
        );
        let groups = own_cgroups(own);
        assert_eq!(groups[0].0, ["memory"]);
        assert_eq!(
            groups[2].0,
            Vec::<String>::new(),
            "v2's line has no controllers"
        );
        // Nowhere to put a limit: said so.
        let none = MemoryLimits::detect_in("0::/\n", "", "w1");
        assert!(
            none.describe()
                .starts_with("not enforced: no cgroup memory controller"),
            "{none:?}"
        );
    }
}
