//! cgroup v2: finding the mount, creating the gateway cgroup, reading ids, moving processes.
