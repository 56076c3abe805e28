//! Validation of VmPool specs.

use super::*;

impl Validator {
    pub(super) fn vm_pool(&mut self, path: &FieldPath, spec: &VmPoolSpec) {
        self.vm_template(&path.key("template"), &spec.template);
        self.range(
            path.key("maxSize"),
            spec.max_size,
            (1, vm_pool::MAX_POOL_SIZE),
            "",
        );
        if spec.min_ready > spec.max_size && spec.max_size >= 1 {
            self.error(
                path.key("minReady"),
                format!(
                    "{} is greater than maxSize {}; lower minReady or raise maxSize",
                    spec.min_ready, spec.max_size
                ),
            );
        }
        self.range(
            path.key("ttlSeconds"),
            spec.ttl_seconds,
            vm_pool::TTL_SECONDS_RANGE,
            "",
        );
        self.range(
            path.key("healthCheckSeconds"),
            spec.health_check_seconds,
            vm_pool::HEALTH_CHECK_SECONDS_RANGE,
            "",
        );
        self.pool_anomalies(&path.key("anomalies"), &spec.anomalies);
    }

    /// A VM template (a pool's `template`, a sandbox's `template`): image, resources,
    /// network, warm-up steps.
    pub(super) fn vm_template(&mut self, tp: &FieldPath, t: &vm_pool::VmTemplate) {
        self.dns_label(&tp.key("imageRef"), &t.image_ref, "Image name");

        self.pool_resources(&tp.key("resources"), &t.resources);
        self.pool_network(&tp.key("network"), &t.network);
        for (i, step) in t.warmup.iter().enumerate() {
            let wp = tp.key("warmup").index(i);
            self.non_empty(
                wp.key("run"),
                &step.run,
                "write a shell command or remove the step",
            );
            if let Some(name) = &step.name {
                self.no_nul(wp.key("name"), name);
            }
            self.range(
                wp.key("timeoutSeconds"),
                step.timeout_seconds,
                (1, vm_pool::MAX_WARMUP_TIMEOUT_SECONDS),
                "",
            );
        }
    }

    /// `template.resources`: a profile or custom sizes, limits in their ranges.
    fn pool_resources(&mut self, rp: &FieldPath, r: &vm_pool::Resources) {
        let custom = [
            ("vcpu", r.vcpu),
            ("memoryMib", r.memory_mib),
            ("diskGib", r.disk_gib),
        ];
        match r.profile.preset() {
            Some((vcpu, mem, disk)) => {
                for (field, value) in custom {
                    if value.is_some() {
                        self.error(
                            rp.key(field),
                            format!(
                                "only allowed with `profile: custom` (profile `{}` is {vcpu} vCPU, {mem} MiB, {disk} GiB); set `profile: custom` with vcpu, memoryMib and diskGib, or remove {field}",
                                r.profile.as_str()
                            ),
                        );
                    }
                }
            }
            None => {
                let units = [
                    ("vcpu", "the number of vCPUs, e.g. 2"),
                    ("memoryMib", "the memory in MiB, e.g. 2048"),
                    ("diskGib", "the disk size in GiB, e.g. 20"),
                ];
                for ((field, value), (_, example)) in custom.into_iter().zip(units) {
                    if value.is_none() {
                        self.error(
                            rp.key(field),
                            format!("required with `profile: custom`; set {example}"),
                        );
                    }
                }
            }
        }
        debug_assert_eq!(Profile::Custom.preset(), None);
        if let Some(vcpu) = r.vcpu {
            self.range(rp.key("vcpu"), vcpu, vm_pool::VCPU_RANGE, "");
        }
        if let Some(mem) = r.memory_mib {
            self.range(rp.key("memoryMib"), mem, vm_pool::MEMORY_MIB_RANGE, "");
        }
        if let Some(disk) = r.disk_gib {
            self.range(rp.key("diskGib"), disk, vm_pool::DISK_GIB_RANGE, "");
        }
        if let Some(shares) = r.cpu_shares {
            self.range(rp.key("cpuShares"), shares, vm_pool::CPU_SHARES_RANGE, "");
        }
        if let Some(quota) = r.cpu_quota_percent {
            self.range(
                rp.key("cpuQuotaPercent"),
                quota,
                vm_pool::CPU_QUOTA_PERCENT_RANGE,
                " (percent of one host CPU per vCPU)",
            );
        }
        if let Some(limit) = r.memory_hard_limit_mib {
            let least = r
                .resolved()
                .memory_mib
                .saturating_add(vm_pool::MEMORY_HARD_LIMIT_HEADROOM_MIB);
            if limit < least {
                self.error(
                    rp.key("memoryHardLimitMib"),
                    format!("{limit} leaves QEMU no room above the guest's memory: it limits the whole QEMU process, so use at least memoryMib + {} = {least} (the guest's memory plus QEMU's own; under TCG also its translation cache), or remove it", vm_pool::MEMORY_HARD_LIMIT_HEADROOM_MIB),
                );
            } else {
                self.range(
                    rp.key("memoryHardLimitMib"),
                    limit,
                    (least, vm_pool::MAX_MEMORY_HARD_LIMIT_MIB),
                    "",
                );
            }
        }
        for (field, value, range) in [
            (
                "diskReadMibPerSecond",
                r.disk_read_mib_per_second,
                vm_pool::IO_MIB_PER_SECOND_RANGE,
            ),
            (
                "diskWriteMibPerSecond",
                r.disk_write_mib_per_second,
                vm_pool::IO_MIB_PER_SECOND_RANGE,
            ),
            ("diskIops", r.disk_iops, vm_pool::DISK_IOPS_RANGE),
            (
                "netInMibPerSecond",
                r.net_in_mib_per_second,
                vm_pool::IO_MIB_PER_SECOND_RANGE,
            ),
            (
                "netOutMibPerSecond",
                r.net_out_mib_per_second,
                vm_pool::IO_MIB_PER_SECOND_RANGE,
            ),
        ] {
            if let Some(v) = value {
                self.range(rp.key(field), v, range, " (0 means no limit)");
            }
        }
    }

    /// `template.network`: no interface (`isolated`) or a network and a filter (`attached`).
    fn pool_network(&mut self, np: &FieldPath, n: &vm_pool::PoolNetwork) {
        match n.mode {
            PoolNetworkMode::Isolated => {
                for (field, value) in [("networkRef", &n.network_ref), ("filterRef", &n.filter_ref)]
                {
                    if value.is_some() {
                        self.error(
                            np.key(field),
                            format!("not allowed with `mode: isolated` (no network interface); set `mode: attached` to connect the VMs, or remove {field}"),
                        );
                    }
                }
            }
            PoolNetworkMode::Attached => {
                for (field, value, kind) in [
                    ("networkRef", &n.network_ref, "Network"),
                    ("filterRef", &n.filter_ref, "NetworkFilter"),
                ] {
                    match value {
                        Some(name) => self.dns_label(&np.key(field), name, &format!("{kind} name")),
                        None => self.error(
                            np.key(field),
                            format!("required with `mode: attached`; name the {kind} to use (or use `mode: isolated` for no network)"),
                        ),
                    }
                }
            }
        }
    }

    /// `anomalies`: every threshold in its range.
    fn pool_anomalies(&mut self, ap: &FieldPath, a: &vm_pool::AnomalyDetection) {
        for (field, value, range) in [
            ("cpuPercent", a.cpu_percent, vm_pool::ANOMALY_PERCENT_RANGE),
            (
                "cpuSustainedSamples",
                a.cpu_sustained_samples,
                vm_pool::ANOMALY_SAMPLES_RANGE,
            ),
            (
                "diskWriteMibPerSecond",
                a.disk_write_mib_per_second,
                vm_pool::ANOMALY_MIB_PER_SECOND_RANGE,
            ),
            (
                "netTxMibPerSecond",
                a.net_tx_mib_per_second,
                vm_pool::ANOMALY_MIB_PER_SECOND_RANGE,
            ),
            (
                "rateWindowSamples",
                a.rate_window_samples,
                vm_pool::ANOMALY_SAMPLES_RANGE,
            ),
            (
                "memoryPercent",
                a.memory_percent,
                vm_pool::ANOMALY_PERCENT_RANGE,
            ),
            (
                "maxProcesses",
                a.max_processes,
                vm_pool::ANOMALY_MAX_PROCESSES_RANGE,
            ),
            ("zScore", a.z_score, vm_pool::ANOMALY_Z_SCORE_RANGE),
            (
                "baselineSamples",
                a.baseline_samples,
                vm_pool::ANOMALY_SAMPLES_RANGE,
            ),
        ] {
            self.range(ap.key(field), value, range, "");
        }
    }
}
