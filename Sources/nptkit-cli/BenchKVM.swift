import CRawKVM
import CScenarioGuests
import NPTCore
import NPTKit
import NPTScenarios
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Group 8: the KVM backend plugin on this machine's /dev/kvm, with real x86-64 guests (the
/// scenarios' drivers and images, Sources/NPTScenarios), every ratio against raw KVM loops in C
/// (Sources/CRawKVM: plain ioctls, the same guest bytes) measured in the same run, interleaved.
/// The plugin's own counters come through npt_vm_backend_stats (`VirtualMachine.backendStatistics`).
/// Skipped, with the reason, where the plugin or /dev/kvm is missing.
extension Bench {
    static let cr0Long: UInt64 = 0x8001_0033   // PG WP NE ET MP PE

    func longMode(rip: UInt64, cr3: UInt64) -> Registers {
        var r = Registers()
        r.rip = rip; r.rflags = 2; r.gpr[4] = 0x8000
        r.cr0 = Bench.cr0Long; r.cr3 = cr3; r.cr4 = 0x20; r.efer = 0x500
        return r
    }

    func kvmVM(_ registry: BackendRegistry, ram: UInt64 = 2 << 20, mode: VMConfig.MBECMode = .lazy) throws -> VirtualMachine {
        try NPTKitRuntime.makeVM(config: VMConfig(ramSize: ram, defaultPermissions: .all, mbecMode: mode, backendName: "kvm"),
                                 registry: registry)
    }

    /// A registry with the kvm plugin loaded with the --backend-opt arguments (and `extra`).
    func kvmRegistry(_ plugin: String, _ extra: [PluginArgument] = []) throws -> BackendRegistry {
        var args = try backendOpt.map { text in
            guard let a = PluginArgument(parsing: text) else { throw NPTError(.invalidArgument, "--backend-opt '\(text)' is not KEY=VALUE") }
            return a
        }
        args.removeAll { a in extra.contains { $0.key == a.key } }
        let registry = NPTKitRuntime.makeRegistry()
        try NPTKitRuntime.loadPlugin(plugin, arguments: args + extra, into: registry)
        return registry
    }

    func benchKVM() throws {
        print("8. KVM backend (libnptkit-kvm.so on this machine's /dev/kvm; real x86-64 guests; lazy MBEC unless stated)")
        guard let dir = executableDirectory(), access(dir + "/libnptkit-kvm.so", R_OK) == 0 else {
            print("   SKIPPED: libnptkit-kvm.so is not beside this binary\n"); return
        }
        let plugin = dir + "/libnptkit-kvm.so"
        let registry = try kvmRegistry(plugin)
        do { try NPTKitRuntime.destroyVM(try kvmVM(registry)) } catch {
            print("   SKIPPED: \(error)\n"); return
        }
        let load0 = loadAverage()
        let raw = try benchKVMAgainstRaw(registry: registry)
        try benchKVMSystemCalls(registry: registry)
        try benchKVMFlush(plugin: plugin, rawMMIOWrite: raw.mmioWrite)
        let load1 = loadAverage()
        print("   Load average at the start and end of this group: \(load0.text) / \(load1.text) (\(load0.cores) cores)")
        if max(load0.oneMinute, load1.oneMinute) > Double(load0.cores) {
            print("   WARNING: the load average exceeded the core count during this group: other work competed for the CPUs, the")
            print("   absolute figures are inflated and noisy; read the ratios, each taken between figures of this same run.")
        }
        print("")
    }

    /// (b) System-call round trip: the HVCI scenario's user process (its driver, without the attacks),
    /// K1 against K2 calls, and the MBEC exits per call per policy shape and mode.
    func benchKVMSystemCalls(registry: BackendRegistry) throws {
        let hvci = try HVCIScenario.image(for: .x86_64)
        func kernelRun(mbec: Bool, calls: UInt64, mode: VMConfig.MBECMode = .lazy,
                       shape: PolicyShape = .hvci) throws -> (UInt64, VMStatistics, [BackendStatistic]) {
            let vm = try kvmVM(registry, mode: mode)
            defer { try? NPTKitRuntime.destroyVM(vm) }
            // mbec: the image's policy (the CPU's own structures keep R|W|SX|UX, a limit of this KVM).
            let policy = mbec ? shape.apply(hvci.policy.map(\.range)) : []
            let v = try HVCIScenario(syscalls: Int(calls), attacks: false).prepare(vm, policy: policy)
            let t0 = Monitor.now()
            let o = try HVCIScenario.drive(v)
            let dt = Monitor.now() - t0
            guard o.printed.count == calls else { throw NPTError(.state, "the HVCI guest printed \(o.printed.count) of \(calls)") }
            return (dt, vm.statistics(), try vm.backendStatistics())
        }
        let (k1, k2): (UInt64, UInt64) = quick ? (5, 25) : (20, 220)
        let reps = quick ? 1 : 3
        var t = Table(["policy", "exits per call", "hierarchy switches per call", "data accesses completed by the plugin per call",
                       "wall time per call (median)", "memslot updates per layout install"])
        for mbec in [false, true] {
            var times: [UInt64] = []
            var exits = 0.0, switches = 0.0, mmio = 0.0, slotsPerInstall = "-"
            for _ in 0..<reps {
                let (d1, s1, b1) = try kernelRun(mbec: mbec, calls: k1)
                let (d2, s2, b2) = try kernelRun(mbec: mbec, calls: k2)
                let completed = { (b: [BackendStatistic]) in (b.value("mmio_completed_ram") ?? 0) &+ (b.value("mmio_completed_nvdimm") ?? 0) }
                mmio = Double(completed(b2) &- completed(b1)) / Double(k2 - k1)
                times.append(d2 > d1 ? (d2 - d1) / (k2 - k1) : 0)   // 0: the two runs' noise exceeded their difference
                exits = Double(s2.exitsTotal - s1.exitsTotal) / Double(k2 - k1)
                switches = Double(s2.hierarchySwitches - s1.hierarchySwitches) / Double(k2 - k1)
                if let installs = b2.value("layout_installs"), let updates = b2.value("memslot_updates"), installs > 0 {
                    slotsPerInstall = fmt(Double(updates) / Double(installs))
                }
            }
            t.add([mbec ? "MBEC (kernel R|SX, user R|UX)" : "none (all R|W|SX|UX)", fmt(exits), fmt(switches), fmt(mmio),
                   nanos(Bench.percentile(times, 0.5)), slotsPerInstall])
        }
        print("   System-call round trip, HVCI scenario (INT3 into the guest kernel, IRETQ back; \(k2) against \(k1) calls, \(reps) runs):")
        print(t.render())
        // Exits per call per policy shape and mode (exact is refused here: no exit on the return).
        var shapes = Table(["policy", "mode", "exits / call", "escalation", "EPT violation", "switches / call", "wall time / call"])
        for shape in PolicyShape.allCases {
            for mode in [VMConfig.MBECMode.lazy, .violationOnly] {
                let (d1, s1, _) = try kernelRun(mbec: true, calls: k1, mode: mode, shape: shape)
                let (d2, s2, _) = try kernelRun(mbec: true, calls: k2, mode: mode, shape: shape)
                let n = Double(k2 - k1)
                shapes.add([shape.rawValue, "\(mode)", fmt(Double(s2.exitsTotal - s1.exitsTotal) / n - 1),
                            fmt(Double(s2.exitsEscalation - s1.exitsEscalation) / n), fmt(Double(s2.exitsEPTViolation - s1.exitsEPTViolation) / n),
                            fmt(Double(s2.hierarchySwitches - s1.hierarchySwitches) / n), d2 > d1 ? nanos((d2 - d1) / (k2 - k1)) : "(noise)"])
            }
        }
        print("   MBEC exits per call (the call's own OUT not counted) per policy shape and mode; exact is refused on this backend:")
        print(shapes.render())
    }

    /// (c) Guest flush: the NVDIMM scenario's guest on a host region that needs WPQ flushing (the vFHA
    /// traps) and on one that does not (plugin argument pmem-needs-flush=0: no exit), interleaved run by
    /// run; the vFHA trap itself against a raw MMIO-write exit.
    func benchKVMFlush(plugin: String, rawMMIOWrite: [UInt64]) throws {
        let records = quick ? 16 : 64
        let flushReps = quick ? 1 : 5
        // Each kind of host region from a load of the plugin configured to offer it.
        var registries: [Bool: BackendRegistry] = [:]
        for needs in [true, false] {
            registries[needs] = try kvmRegistry(plugin, [PluginArgument(key: "pmem-needs-flush", value: needs ? "1" : "0")])
        }
        let dirName = backendOpt.compactMap(PluginArgument.init(parsing:)).last { $0.key == "pmem-dir" }?.value ?? "/tmp (default)"
        var samples: [Bool: [UInt64]] = [true: [], false: []]
        var msyncs: UInt64 = 0, msyncNanos: UInt64 = 0
        var rows: [Bool: [String]] = [:]
        for rep in 0..<flushReps {
            for (k, needs) in [true, false].enumerated() {
                let vm = try kvmVM(registries[needs]!)
                defer { try? NPTKitRuntime.destroyVM(vm) }
                let v = try NVDIMMScenario(needsWPQFlush: needs, records: records, tail: false,
                                           logOffset: UInt64(rep * 2 + k) % 8 * NVDIMMScenario.logStride).setUp(vm)[0]
                vm.recordFlushLatencies(true)
                let t0 = Monitor.now()
                var last = t0
                var outs = 0
                while true {
                    let x = try v.run()
                    if x.reason == .io {
                        let now = Monitor.now()
                        if outs > 0 { samples[needs, default: []].append(now &- last) }
                        last = now
                        outs += 1
                        continue
                    }
                    guard x.reason == .halt else { throw NPTError(.state, "NVDIMM guest: unexpected exit \(x)") }
                    break
                }
                let dt = Monitor.now() - t0
                guard outs == records else { throw NPTError(.state, "the NVDIMM guest announced \(outs) of \(records) records") }
                let b = try vm.backendStatistics()
                if needs { msyncs &+= b.value("physical_flushes") ?? 0; msyncNanos &+= b.value("physical_flush_ns") ?? 0 }
                let lat = vm.flushLatencies()
                let f = vm.flushStatistics()
                rows[needs] = [needs ? "needs flushing" : "needs none (pmem-needs-flush=0)", vm.flushHintTrapped ? "yes" : "no", "\(f.exits)",
                               lat.isEmpty ? "- (no exit)" : nanos(Bench.percentile(lat, 0.5)),
                               lat.isEmpty ? "-" : nanos(Bench.percentile(lat, 0.99)), nanos(dt / UInt64(records))]
            }
        }
        var ft = Table(["host region (file in \(dirName))", "vFHA trapped", "flush exits", "guest flush latency (median)", "p99",
                        "wall time per record"])
        for needs in [true, false] { if let row = rows[needs] { ft.add(row) } }
        print("   Guest flush (\(records) records: store, CLFLUSHOPT, SFENCE, vFHA write; the physical flush is an msync of the backing file;")
        print("   the last of \(flushReps) interleaved runs):")
        print(ft.render())
        if let trapped = samples[true], let plain = samples[false], !trapped.isEmpty, !plain.isEmpty, msyncs > 0 {
            let msync = Double(msyncNanos) / Double(msyncs)
            let trap = Double(Bench.percentile(trapped, 0.5)) - Double(Bench.percentile(plain, 0.5)) - msync
            let raw = rawMMIOWrite.isEmpty ? 0 : Double(Bench.percentile(rawMMIOWrite, 0.5))
            print("   Per record, \(flushReps) runs: trapped \(spread(trapped)), not trapped \(spread(plain)), msync \(nanos(UInt64(msync))) (mean,")
            print("   the plugin's physical_flush_ns / physical_flushes).")
            print("   The vFHA trap itself (trapped - not trapped - msync, p50): \(nanos(UInt64(max(0, trap))))"
                  + (raw > 0 ? " = \(fmt(trap / raw))x a raw MMIO-write exit (\(spread(rawMMIOWrite)), same run)" : ""))
        }
        print("   Latency = the core's exit-to-resume handling of a trapped vFHA write (the msync included, KVM's own exit and")
        print("   re-entry not). CPL 0 code is emulated on this KVM (docs/kvm-on-this-machine.md).")
    }
}

/// Keeps `x` alive (a loop the optimizer may not drop).
@inline(never) func blackHole(_ x: UInt64) { if x == 0x5EED_5EED_5EED_5EED { print("") } }

/// The load average (/proc/loadavg) and the number of online cores.
struct LoadAverage {
    var oneMinute: Double
    var text: String
    var cores: Int
}

func loadAverage() -> LoadAverage {
    var text = "?"
    if let f = fopen("/proc/loadavg", "r") {
        var buf = [CChar](repeating: 0, count: 128)
        if fgets(&buf, 128, f) != nil {
            text = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                .split(separator: " ").prefix(3).joined(separator: " ")
        }
        fclose(f)
    }
    let one = Double(text.split(separator: " ").first ?? "") ?? 0
    return LoadAverage(oneMinute: one, text: text, cores: sysconf(Int32(_SC_NPROCESSORS_ONLN)))
}

/// "p50 X (p10 Y, p90 Z; n = N)".
func spread(_ xs: [UInt64]) -> String {
    guard !xs.isEmpty else { return "-" }
    return "\(nanos(Bench.percentile(xs, 0.5))) (p10 \(nanos(Bench.percentile(xs, 0.1))), p90 \(nanos(Bench.percentile(xs, 0.9))); n = \(xs.count))"
}

/// The same for ratios.
func spreadRatio(_ xs: [Double]) -> String {
    guard !xs.isEmpty else { return "-" }
    let s = xs.sorted()
    func at(_ p: Double) -> Double { s[min(s.count - 1, Int(Double(s.count - 1) * p + 0.5))] }
    return "\(fmt(at(0.5)))x (p10 \(fmt(at(0.1)))x, p90 \(fmt(at(0.9)))x; n = \(s.count))"
}
