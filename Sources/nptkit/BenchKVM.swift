import CScenarioGuests
import NPTCore
import NPTKit
import NPTScenarios
#if canImport(Glibc)
import Glibc
#endif

/// Group 8: the KVM backend plugin on this machine's /dev/kvm, with real x86-64 guests (the
/// scenarios' drivers and images, Sources/NPTScenarios; the hello guest for the raw exit). Skipped,
/// with the reason, where the plugin or /dev/kvm is missing.
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

    func benchKVM() throws {
        print("8. KVM backend (libnptkit-kvm.so on this machine's /dev/kvm; real x86-64 guests; lazy MBEC unless stated)")
        guard let dir = executableDirectory(), access(dir + "/libnptkit-kvm.so", R_OK) == 0 else {
            print("   SKIPPED: libnptkit-kvm.so is not beside this binary\n"); return
        }
        let plugin = dir + "/libnptkit-kvm.so"
        let registry = NPTKitRuntime.makeRegistry()
        try NPTKitRuntime.loadPlugin(plugin, into: registry)
        do { try NPTKitRuntime.destroyVM(try kvmVM(registry)) } catch {
            print("   SKIPPED: \(error)\n"); return
        }

        // (a) Raw exit round trip: each OUT of the hello guest is one exit (npt_vcpu_run returns it).
        let hello = scenario_x86_guest("hello_guest")
        var exitSamples: [UInt64] = []
        let helloRuns = quick ? 20 : 200
        do {
            let vm = try kvmVM(registry)
            defer { try? NPTKitRuntime.destroyVM(vm) }
            try vm.writeMemory(GPA(UInt64(HELLO_GUEST_BASE)), UnsafeRawBufferPointer(start: hello.bytes, count: hello.length))
            let v = try vm.makeVCPU(index: 0)
            for _ in 0..<helloRuns {
                try v.setRegisters(longMode(rip: UInt64(HELLO_GUEST_LONG_ENTRY), cr3: UInt64(HELLO_GUEST_CR3)))
                while true {
                    let t0 = Monitor.now()
                    let x = try v.run()
                    let dt = Monitor.now() - t0
                    if x.reason == .io { exitSamples.append(dt); continue }
                    break
                }
            }
        }
        let rawExit = Bench.percentile(exitSamples, 0.5)
        print("   Raw exit round trip (an OUT exit through npt_vcpu_run, hello guest, median of \(exitSamples.count)): \(nanos(rawExit)), p99 \(nanos(Bench.percentile(exitSamples, 0.99)))")

        // (b) System-call round trip: the HVCI scenario's user process (its driver, without the attacks), K1 against K2 calls.
        let hvci = try HVCIScenario.image(for: .x86_64)
        func kernelRun(mbec: Bool, calls: UInt64, mode: VMConfig.MBECMode = .lazy,
                       shape: PolicyShape = .hvci) throws -> (UInt64, VMStatistics, (UInt64, UInt64)?, UInt64) {
            let vm = try kvmVM(registry, mode: mode)
            defer { try? NPTKitRuntime.destroyVM(vm) }
            // mbec: the image's policy (the CPU's own structures keep R|W|SX|UX, a limit of this KVM).
            let policy = mbec ? shape.apply(hvci.policy.map(\.range)) : []
            let v = try HVCIScenario(syscalls: Int(calls), attacks: false).prepare(vm, policy: policy)
            let before = PluginV2.layoutStats
            let mmio0 = PluginV2.mmioStats ?? 0
            let t0 = Monitor.now()
            let o = try HVCIScenario.drive(v)
            let dt = Monitor.now() - t0
            guard o.printed.count == calls else { throw NPTError(.state, "the HVCI guest printed \(o.printed.count) of \(calls)") }
            let after = PluginV2.layoutStats
            let slots = before.flatMap { b in after.map { ($0.switches - b.switches, $0.updates - b.updates) } }
            return (dt, vm.statistics(), slots, (PluginV2.mmioStats ?? 0) &- mmio0)
        }
        let (k1, k2): (UInt64, UInt64) = quick ? (5, 25) : (20, 220)
        let reps = quick ? 1 : 3
        var t = Table(["policy", "exits per call", "hierarchy switches per call", "data accesses completed by the plugin per call",
                       "wall time per call (median)", "memslot updates per switch"])
        var perCall: [Bool: UInt64] = [:]
        var switchesPerCall = 0.0
        for mbec in [false, true] {
            var times: [UInt64] = []
            var exits = 0.0, switches = 0.0, mmio = 0.0, slotsPerSwitch = "-"
            for _ in 0..<reps {
                let (d1, s1, _, m1) = try kernelRun(mbec: mbec, calls: k1)
                let (d2, s2, slots, m2) = try kernelRun(mbec: mbec, calls: k2)
                mmio = Double(m2 &- m1) / Double(k2 - k1)
                times.append((d2 &- d1) / (k2 - k1))
                exits = Double(s2.exitsTotal - s1.exitsTotal) / Double(k2 - k1)
                switches = Double(s2.hierarchySwitches - s1.hierarchySwitches) / Double(k2 - k1)
                if let (sw, up) = slots, sw > 0, s2.hierarchySwitches > 0 { slotsPerSwitch = fmt(Double(up) / Double(sw)) }
            }
            let m = Bench.percentile(times, 0.5)
            perCall[mbec] = m
            if mbec { switchesPerCall = switches }
            t.add([mbec ? "MBEC (kernel R|SX, user R|UX)" : "none (all R|W|SX|UX)", fmt(exits), fmt(switches), fmt(mmio), nanos(m), slotsPerSwitch])
        }
        print("   System-call round trip (INT3 into the guest kernel, IRETQ back; \(k2) against \(k1) calls, \(reps) runs):")
        print(t.render())
        if let a = perCall[false], let b = perCall[true], switchesPerCall > 0 {
            print("   One hierarchy switch (its exit and the memslot updates): about \(nanos(UInt64(Double(b &- a) / switchesPerCall))) (the per-call difference / switches per call)")
        }
        // Exits per call per policy shape and mode (exact is refused here: no exit on the return).
        var shapes = Table(["policy", "mode", "exits / call", "escalation", "EPT violation", "switches / call", "wall time / call"])
        for shape in PolicyShape.allCases {
            for mode in [VMConfig.MBECMode.lazy, .violationOnly] {
                let (d1, s1, _, _) = try kernelRun(mbec: true, calls: k1, mode: mode, shape: shape)
                let (d2, s2, _, _) = try kernelRun(mbec: true, calls: k2, mode: mode, shape: shape)
                let n = Double(k2 - k1)
                shapes.add([shape.rawValue, "\(mode)", fmt(Double(s2.exitsTotal - s1.exitsTotal) / n - 1),
                            fmt(Double(s2.exitsEscalation - s1.exitsEscalation) / n), fmt(Double(s2.exitsEPTViolation - s1.exitsEPTViolation) / n),
                            fmt(Double(s2.hierarchySwitches - s1.hierarchySwitches) / n), nanos((d2 &- d1) / (k2 - k1))])
            }
        }
        print("   MBEC exits per call (the call's own OUT not counted) per policy shape and mode; exact is refused on this backend:")
        print(shapes.render())

        // (c) Guest flush latency, the vFHA trapped (host region needs flushing) and not: the NVDIMM scenario's
        // driver and image.
        let records: UInt64 = quick ? 16 : 64
        var ft = Table(["backing file", "vFHA trapped", "flush exits", "guest flush latency (median)", "p99", "wall time per record"])
        // The plugin creates its backing file once per process, in $NPTKIT_KVM_PMEM_DIR (default /tmp).
        let dirName = String(cString: getenv("NPTKIT_KVM_PMEM_DIR") ?? strdup("/tmp"))
        for (k, needs) in [true, false].enumerated() {
            PluginV2.configure(hostPMemNeedsFlush: needs)
            let vm = try kvmVM(registry)
            defer { try? NPTKitRuntime.destroyVM(vm) }
            let v = try NVDIMMScenario(needsWPQFlush: needs, records: Int(records), tail: false,
                                       logOffset: UInt64(k) * NVDIMMScenario.logStride).setUp(vm)[0]
            vm.recordFlushLatencies(true)
            let t0 = Monitor.now()
            let outs = UInt64(try NVDIMMScenario.runToHalt(v).count)
            let dt = Monitor.now() - t0
            guard outs == records else { throw NPTError(.state, "the NVDIMM guest announced \(outs) of \(records) records") }
            let lat = vm.flushLatencies()
            let f = vm.flushStatistics()
            ft.add([dirName, vm.flushHintTrapped ? "yes" : "no", "\(f.exits)",
                    lat.isEmpty ? "- (no exit)" : nanos(Bench.percentile(lat, 0.5)),
                    lat.isEmpty ? "-" : nanos(Bench.percentile(lat, 0.99)), nanos(dt / records)])
        }
        print("   Guest flush (\(records) records: store, CLFLUSHOPT, SFENCE, vFHA write; the physical flush is an msync of the backing file):")
        print(ft.render())
        print("   Latency = the core's exit-to-resume handling of a trapped vFHA write (the msync included, KVM's own exit and")
        print("   re-entry not). CPL 0 code is emulated on this KVM (docs/kvm-on-this-machine.md).\n")
    }
}
