import CKVMGuests
import NPTCore
import NPTKit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Group 8: the KVM backend plugin on this machine's /dev/kvm, with the plugin's real x86-64 test
/// guests (Plugins/KVM/Guest). Skipped, with the reason, where the plugin or /dev/kvm is missing.
extension Bench {
    static let cr0Long: UInt64 = 0x8001_0033   // PG WP NE ET MP PE
    static let pmemGPA: UInt64 = 0x4000_0000

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

    /// The plugin's extra export (npt_kvm_layout_stats): layout switches and memslot updates.
    func layoutStats(_ plugin: String) -> (switches: UInt64, updates: UInt64)? {
        guard let h = dlopen(plugin, RTLD_NOW | RTLD_NOLOAD), let f = dlsym(h, "npt_kvm_layout_stats") else { return nil }
        typealias Fn = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void
        var s: UInt64 = 0, u: UInt64 = 0, l: UInt64 = 0
        unsafeBitCast(f, to: Fn.self)(&s, &u, &l)
        return (s, u)
    }

    /// The plugin's extra export (npt_kvm_mmio_stats): data accesses it completed (RAM, NVDIMM).
    func mmioStats(_ plugin: String) -> UInt64? {
        guard let h = dlopen(plugin, RTLD_NOW | RTLD_NOLOAD), let f = dlsym(h, "npt_kvm_mmio_stats") else { return nil }
        typealias Fn = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void
        var r: UInt64 = 0, n: UInt64 = 0
        unsafeBitCast(f, to: Fn.self)(&r, &n)
        return r + n
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

        let load0 = loadAverage()
        let rawMMIOWrite = try benchKVMAgainstRaw(registry: registry, plugin: plugin)

        // (b) System-call round trip: the guest kernel's user process, K1 against K2 calls.
        var entry: UInt64 = 0, kcode: UInt64 = 0, kstack: UInt64 = 0, kfunc: UInt64 = 0, ucode: UInt64 = 0, ustack: UInt64 = 0
        let kernel = nptk_guest_kernel(&entry, &kcode, &kstack, &kfunc, &ucode, &ustack)
        func kernelRun(mbec: Bool, calls: UInt64, mode: VMConfig.MBECMode = .lazy,
                       shape: PolicyShape = .hvci) throws -> (UInt64, VMStatistics, (UInt64, UInt64)?, UInt64) {
            let vm = try kvmVM(registry, mode: mode)
            defer { try? NPTKitRuntime.destroyVM(vm) }
            try vm.writeMemory(GPA(kernel.base), UnsafeRawBufferPointer(start: kernel.bytes, count: kernel.length))
            if mbec {
                // As Tests/C/test_kvm.c: the CPU's own structures (page tables, GDT/IDT/TSS, kernel
                // stack) stay executable in both hierarchies (a limit of this KVM, Plugins/KVM/README.md).
                try vm.setPolicy(shape.apply([
                    PolicyRange(start: GPA(kcode), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]),
                    PolicyRange(start: GPA(kfunc), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]),
                    PolicyRange(start: GPA(ucode), size: 0x1000, pageSize: .size4K, permissions: [.read, .userExecute]),
                    PolicyRange(start: GPA(ustack), size: 0x1000, pageSize: .size4K, permissions: [.read, .write]),
                ]))
            }
            let v = try vm.makeVCPU(index: 0)
            var r = longMode(rip: entry, cr3: kernel.cr3)
            r.gpr[14] = calls; r.gpr[15] = 0
            try v.setRegisters(r)
            let before = layoutStats(plugin)
            let mmio0 = mmioStats(plugin) ?? 0
            let t0 = Monitor.now()
            var printed: UInt64 = 0
            while true {
                let x = try v.run()
                if x.reason == .io && x.ioPort == 0xE9 { printed += 1; continue }
                guard x.reason == .halt else { throw NPTError(.state, "kernel guest: unexpected exit \(x)") }
                break
            }
            let dt = Monitor.now() - t0
            guard printed == calls else { throw NPTError(.state, "kernel guest printed \(printed) of \(calls)") }
            let after = layoutStats(plugin)
            let slots = before.flatMap { b in after.map { ($0.switches - b.switches, $0.updates - b.updates) } }
            return (dt, vm.statistics(), slots, (mmioStats(plugin) ?? 0) &- mmio0)
        }
        let (k1, k2): (UInt64, UInt64) = quick ? (5, 25) : (20, 220)
        let reps = quick ? 1 : 3
        var t = Table(["policy", "exits per call", "hierarchy switches per call", "data accesses completed by the plugin per call",
                       "wall time per call (median)", "memslot updates per layout install"])
        var perCall: [Bool: UInt64] = [:]
        var switchesPerCall = 0.0
        for mbec in [false, true] {
            var times: [UInt64] = []
            var exits = 0.0, switches = 0.0, mmio = 0.0, slotsPerSwitch = "-"
            for _ in 0..<reps {
                let (d1, s1, _, m1) = try kernelRun(mbec: mbec, calls: k1)
                let (d2, s2, slots, m2) = try kernelRun(mbec: mbec, calls: k2)
                mmio = Double(m2 &- m1) / Double(k2 - k1)
                times.append(d2 > d1 ? (d2 - d1) / (k2 - k1) : 0)   // 0: the two runs' noise exceeded their difference
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
            print("   One hierarchy switch (its exits and the move between views): about \(nanos(UInt64(max(0, Double(b) - Double(a)) / switchesPerCall))) (the per-call difference / switches per call)")
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
                            fmt(Double(s2.hierarchySwitches - s1.hierarchySwitches) / n), d2 > d1 ? nanos((d2 - d1) / (k2 - k1)) : "(noise)"])
            }
        }
        print("   MBEC exits per call (the call's own OUT not counted) per policy shape and mode; exact is refused on this backend:")
        print(shapes.render())

        // (c) Guest flush latency, the vFHA trapped (host region needs flushing) and not.
        var flushEntry: UInt64 = 0
        let pmem = nptk_guest_pmem(&flushEntry)
        let records: UInt64 = quick ? 16 : 64
        var ft = Table(["backing file", "vFHA trapped", "flush exits", "guest flush latency (median)", "p99", "wall time per record"])
        // The plugin creates its backing file once per process, in $NPTKIT_KVM_PMEM_DIR (default /tmp).
        let dirName = String(cString: getenv("NPTKIT_KVM_PMEM_DIR") ?? strdup("/tmp"))
        // Per-record samples (the time between two records' OUTs), trapped and not, over `flushReps`
        // interleaved runs; the table shows the last run of each.
        var samples: [Bool: [UInt64]] = [true: [], false: []]
        var msyncs: UInt64 = 0, msyncNanos: UInt64 = 0
        let pmemStats = pluginSymbol(plugin, "npt_kvm_pmem_stats").map { unsafeBitCast($0, to: PmemStatsFn.self) }
        let flushReps = quick ? 1 : 5
        var rows: [Bool: [String]] = [:]
        for _ in 0..<flushReps {
            for needs in [true, false] {
                setenv("NPTKIT_KVM_PMEM_NEEDS_FLUSH", needs ? "1" : "0", 1)
                let vm = try kvmVM(registry)
                defer { try? NPTKitRuntime.destroyVM(vm) }
                try vm.addNVDIMM(gpa: GPA(Bench.pmemGPA), size: 2 << 20, hostRegion: 1, regionOffset: 0)
                guard let vfha = vm.virtualFlushHint else { throw NPTError(.state, "no vFHA") }
                try vm.writeMemory(GPA(pmem.base), UnsafeRawBufferPointer(start: pmem.bytes, count: pmem.length))
                let v = try vm.makeVCPU(index: 0)
                var r = longMode(rip: flushEntry, cr3: pmem.cr3)
                r.gpr[7] = Bench.pmemGPA; r.gpr[6] = vfha.raw; r.gpr[1] = records
                try v.setRegisters(r)
                vm.recordFlushLatencies(true)
                var f0: UInt64 = 0, n0: UInt64 = 0
                pmemStats?(&f0, &n0)
                let t0 = Monitor.now()
                var last = t0
                var outs: UInt64 = 0
                while true {
                    let x = try v.run()
                    if x.reason == .io && x.ioPort == 0xE9 {
                        let now = Monitor.now()
                        if outs > 0 { samples[needs, default: []].append(now &- last) }
                        last = now
                        outs += 1
                        continue
                    }
                    guard x.reason == .halt else { throw NPTError(.state, "pmem guest: unexpected exit \(x)") }
                    break
                }
                let dt = Monitor.now() - t0
                guard outs == records else { throw NPTError(.state, "pmem guest wrote \(outs) of \(records) records") }
                if needs {
                    var f1: UInt64 = 0, n1: UInt64 = 0
                    pmemStats?(&f1, &n1)
                    msyncs &+= f1 &- f0; msyncNanos &+= n1 &- n0
                }
                let lat = vm.flushLatencies()
                let f = vm.flushStatistics()
                rows[needs] = [dirName, vm.flushHintTrapped ? "yes" : "no", "\(f.exits)",
                               lat.isEmpty ? "- (no exit)" : nanos(Bench.percentile(lat, 0.5)),
                               lat.isEmpty ? "-" : nanos(Bench.percentile(lat, 0.99)), nanos(dt / records)]
            }
        }
        for needs in [true, false] { if let row = rows[needs] { ft.add(row) } }
        unsetenv("NPTKIT_KVM_PMEM_NEEDS_FLUSH")
        print("   Guest flush (\(records) records: store, CLFLUSHOPT, SFENCE, vFHA write; the physical flush is an msync of the backing file):")
        print(ft.render())
        if let trapped = samples[true], let plain = samples[false], !trapped.isEmpty, !plain.isEmpty, msyncs > 0 {
            let msync = Double(msyncNanos) / Double(msyncs)
            let trap = Double(Bench.percentile(trapped, 0.5)) - Double(Bench.percentile(plain, 0.5)) - msync
            let raw = rawMMIOWrite.isEmpty ? 0 : Double(Bench.percentile(rawMMIOWrite, 0.5))
            print("   Per record, \(flushReps) runs: trapped \(spread(trapped)), not trapped \(spread(plain)), msync \(nanos(UInt64(msync))) (mean).")
            print("   The vFHA trap itself (trapped - not trapped - msync, p50): \(nanos(UInt64(max(0, trap))))"
                  + (raw > 0 ? " = \(fmt(trap / raw))x a raw MMIO-write exit (\(spread(rawMMIOWrite)), same run)" : ""))
        }
        print("   Latency = the core's exit-to-resume handling of a trapped vFHA write (the msync included, KVM's own exit and")
        print("   re-entry not). CPL 0 code is emulated on this KVM (docs/kvm-on-this-machine.md).")
        let load1 = loadAverage()
        print("   Load average at the start and end of this group: \(load0.text) / \(load1.text) (\(load0.cores) cores)")
        if max(load0.oneMinute, load1.oneMinute) > Double(load0.cores) {
            print("   WARNING: the load average exceeded the core count during this group: other work competed for the CPUs, the")
            print("   absolute figures are inflated and noisy; read the ratios, each taken between figures of this same run.")
        }
        print("")
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

extension Bench {
    typealias RawExitFn = @convention(c) (Int32, Int32, UnsafeMutablePointer<UInt64>?) -> Int32
    typealias RawSyscallsFn = @convention(c) (Int32, Int32, Int32, Int32, UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Int32
    typealias RawGuestFn = @convention(c) (UnsafeMutablePointer<Int>?, UnsafeMutablePointer<UInt64>?) -> UnsafePointer<UInt8>?
    typealias ViewStatsFn = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?,
                                            UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void
    typealias PmemStatsFn = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void

    func pluginSymbol(_ plugin: String, _ name: String) -> UnsafeMutableRawPointer? {
        guard let h = dlopen(plugin, RTLD_NOW | RTLD_NOLOAD) else { return nil }
        return dlsym(h, name)
    }

    // The two-vCPU guest kernel (Plugins/KVM/Guest/smp.S; the raw loops run the same bytes).
    static let smpCode: UInt64 = 0x6000, smpOutLoop: UInt64 = 0x6080, smpKfunc: UInt64 = 0x8000, smpUser: UInt64 = 0x9000

    /// 8a: every ratio against C code that drives /dev/kvm itself (Plugins/KVM/CKVM/rawbench.c, in the
    /// plugin), interleaved round by round with the library so that both see the same machine load.
    /// Returns the raw MMIO-write exit samples (for the vFHA line).
    func benchKVMAgainstRaw(registry: BackendRegistry, plugin: String) throws -> [UInt64] {
        guard let rawExitSym = pluginSymbol(plugin, "npt_kvm_raw_exit_loop"),
              let rawSyscallsSym = pluginSymbol(plugin, "npt_kvm_raw_syscalls"),
              let rawGuestSym = pluginSymbol(plugin, "npt_kvm_raw_guest") else {
            print("   SKIPPED (against raw KVM): the plugin has no npt_kvm_raw_* exports\n"); return []
        }
        let rawExit = unsafeBitCast(rawExitSym, to: RawExitFn.self)
        let rawSyscalls = unsafeBitCast(rawSyscallsSym, to: RawSyscallsFn.self)
        let viewStats = pluginSymbol(plugin, "npt_kvm_view_stats").map { unsafeBitCast($0, to: ViewStatsFn.self) }
        typealias MoveStatsFn = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void
        let moveStatsFn = pluginSymbol(plugin, "npt_kvm_move_stats").map { unsafeBitCast($0, to: MoveStatsFn.self) }
        func moveStats() -> (moves: UInt64, nanos: UInt64) {
            var m: UInt64 = 0, ns: UInt64 = 0
            moveStatsFn?(&m, &ns)
            return (m, ns)
        }
        var guestLength = 0, guestBase: UInt64 = 0
        guard let guest = unsafeBitCast(rawGuestSym, to: RawGuestFn.self)(&guestLength, &guestBase) else { return [] }
        let image = UnsafeRawBufferPointer(start: guest, count: guestLength)
        let rounds = quick ? 2 : 5, n = quick ? 300 : 1000

        func smpVM(mbec: Bool) throws -> VirtualMachine {
            let vm = try kvmVM(registry)
            try vm.writeMemory(GPA(guestBase), image)
            if mbec {
                _ = try vm.setPolicy([
                    PolicyRange(start: GPA(Bench.smpCode), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]),
                    PolicyRange(start: GPA(Bench.smpKfunc), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]),
                    PolicyRange(start: GPA(Bench.smpUser), size: 0x1000, pageSize: .size4K, permissions: [.read, .userExecute]),
                ])
            }
            return vm
        }
        func kernelRegs(index: UInt64, calls: UInt64) -> Registers {
            var r = longMode(rip: Bench.smpCode, cr3: 0x1000)
            r.gpr[7] = index; r.gpr[14] = calls; r.gpr[15] = 0
            return r
        }
        func check(_ rc: Int32, _ what: String) throws {
            if rc < 0 { throw NPTError(.backend, "\(what): errno \(-rc)") }
        }
        /// Samples of the time between two system calls (two OUTs) of vCPU 0, after 50 warm-up calls.
        func librarySyscalls(mbec: Bool, count: Int) throws -> [UInt64] {
            let vm = try smpVM(mbec: mbec)
            defer { try? NPTKitRuntime.destroyVM(vm) }
            let v = try vm.makeVCPU(index: 0)
            try v.setRegisters(kernelRegs(index: 0, calls: 1 << 40))
            var out: [UInt64] = []
            var last: UInt64 = 0
            var calls = -50
            while out.count < count {
                let x = try v.run()
                guard x.reason == .io && x.ioPort == 0xE9 else { throw NPTError(.state, "smp guest: unexpected exit \(x)") }
                let now = Monitor.now()
                if calls >= 0 { out.append(now &- last) }
                last = now
                calls += 1
            }
            return out
        }

        // 1. The exit round trip: a CPL 0 `out; jmp` loop.
        var rawOut: [UInt64] = [], libOut: [UInt64] = []
        var rawNone: [UInt64] = [], rawTwo: [UInt64] = [], rawTwoMin: [UInt64] = [], libNone: [UInt64] = [], libMBEC: [UInt64] = []
        let v0 = viewStats.map { f in var a: UInt64 = 0, b: UInt64 = 0, c: UInt64 = 0, d: UInt64 = 0; f(&a, &b, &c, &d); return (b, c, d) }
        let mn0 = moveStats()
        var mbecCalls = 0
        for _ in 0..<rounds {
            var buf = [UInt64](repeating: 0, count: n)
            try check(rawExit(Int32(n), 0, &buf), "raw exit loop")
            rawOut += buf
            do {
                let vm = try smpVM(mbec: false)
                defer { try? NPTKitRuntime.destroyVM(vm) }
                let v = try vm.makeVCPU(index: 0)
                try v.setRegisters(longMode(rip: Bench.smpOutLoop, cr3: 0x1000))
                for i in -50..<n {
                    let t0 = Monitor.now()
                    let x = try v.run()
                    let dt = Monitor.now() &- t0
                    guard x.reason == .io && x.ioPort == 0xE9 else { throw NPTError(.state, "out loop: unexpected exit \(x)") }
                    if i >= 0 { libOut.append(dt) }
                }
            }
            // 2. System-call round trips: one VM without a policy (one exit per call), the MBEC policy
            // (three exits and two hierarchy switches per call).
            try check(rawSyscalls(1, Int32(n), 0, 0, &buf, nil), "raw system calls, one VM")
            rawNone += buf
            try check(rawSyscalls(1, Int32(n), 1, 1, &buf, nil), "raw system calls, two VMs")
            rawTwo += buf
            try check(rawSyscalls(1, Int32(n), 1, 0, &buf, nil), "raw system calls, two VMs (registers only)")
            rawTwoMin += buf
            libNone += try librarySyscalls(mbec: false, count: n)
            libMBEC += try librarySyscalls(mbec: true, count: n)
            mbecCalls += n + 50
        }
        let v1 = viewStats.map { f in var a: UInt64 = 0, b: UInt64 = 0, c: UInt64 = 0, d: UInt64 = 0; f(&a, &b, &c, &d); return (b, c, d) }
        let mn1 = moveStats()
        let exitRatio = Double(Bench.percentile(libOut, 0.5)) / Double(Bench.percentile(rawOut, 0.5))
        print("   Against raw KVM in the same run (Plugins/KVM/CKVM/rawbench.c: the same guest code driven by plain ioctls;")
        print("   \(rounds) rounds, the raw loop and the library interleaved; per-sample wall time):")
        var t = Table(["what", "raw KVM", "through NPTKit", "NPTKit / raw (p50)"])
        t.add(["CPL 0 `out` exit round trip (npt_vcpu_run / KVM_RUN)", spread(rawOut), spread(libOut), fmt(exitRatio) + "x"])
        t.add(["system call, no policy (1 exit: the OUT)", spread(rawNone), spread(libNone),
               fmt(Double(Bench.percentile(libNone, 0.5)) / Double(Bench.percentile(rawNone, 0.5))) + "x"])
        t.add(["system call, MBEC (3 exits, 2 switches; raw: two VMs, state carried as the plugin does)", spread(rawTwo), spread(libMBEC),
               fmt(Double(Bench.percentile(libMBEC, 0.5)) / Double(Bench.percentile(rawTwo, 0.5))) + "x"])
        t.add(["the same, raw moving registers only (SYNC_REGS: no XSAVE, XCR0, dirty log)", spread(rawTwoMin), "-", "-"])
        print(t.render())
        func perSwitch(_ mbec: [UInt64], _ none: [UInt64], _ p: Double) -> Double {
            (Double(Bench.percentile(mbec, p)) - Double(Bench.percentile(none, p))) / 2
        }
        let libSwitch = perSwitch(libMBEC, libNone, 0.5), rawSwitch = perSwitch(rawTwo, rawNone, 0.5)
        let libExit = Double(Bench.percentile(libOut, 0.5)), rawExitP50 = Double(Bench.percentile(rawOut, 0.5))
        print("   One hierarchy switch, its exit included ((system call with MBEC - without) / 2, p50): through NPTKit "
              + "\(nanos(UInt64(max(0, libSwitch)))) = \(fmt(libSwitch / libExit))x the library's own exit round trip "
              + "(p10-based: \(nanos(UInt64(max(0, perSwitch(libMBEC, libNone, 0.1))))) = "
              + "\(fmt(perSwitch(libMBEC, libNone, 0.1) / Double(Bench.percentile(libOut, 0.1))))x); raw two VMs "
              + "\(nanos(UInt64(max(0, rawSwitch)))) = \(fmt(rawSwitch / rawExitP50))x the raw exit.")
        if let a = v0, let b = v1 {
            print("   Views during the system-call runs: \(fmt(Double(b.0 - a.0) / Double(max(1, mbecCalls)))) moves per MBEC call, "
                  + "\(b.1 - a.1) zaps, \(fmt(Double(b.2 - a.2) / Double(max(1, mbecCalls)))) dirty-log reads per MBEC call; "
                  + "the plugin's side of a move (view, coherence check, state carried): \(nanos((mn1.nanos &- mn0.nanos) / max(1, mn1.moves &- mn0.moves))) mean over \(mn1.moves &- mn0.moves) moves (descheduled ones included); "
                  + "0 memslot updates per switch (a switch is a move between two KVM VMs).")
        }

        // 3. Two vCPUs in different hierarchies at once, each making system calls, against one alone.
        let reps = quick ? 2 : 5, calls = quick ? 200 : 1000
        var libRatios: [Double] = [], rawRatios: [Double] = []
        var lib1: [UInt64] = [], lib2: [UInt64] = []
        for _ in 0..<reps {
            func libraryWall(cpus: Int) throws -> UInt64 {
                let vm = try smpVM(mbec: true)
                defer { try? NPTKitRuntime.destroyVM(vm) }
                var vs: [VirtualCPU] = []
                for i in 0..<cpus { vs.append(try vm.makeVCPU(index: UInt32(i))) }
                @Sendable func toHalt(_ v: VirtualCPU) throws(NPTError) {
                    while true {
                        let x = try v.run()
                        if x.reason == .io && x.ioPort == 0xE9 { continue }
                        guard x.reason == .halt else { throw NPTError(.state, "smp guest: unexpected exit \(x)") }
                        return
                    }
                }
                // A warm-up run on each vCPU (the views and their KVM vCPUs are created), then the timed one.
                for (i, v) in vs.enumerated() {
                    try v.setRegisters(kernelRegs(index: UInt64(i), calls: 20))
                    try toHalt(v)
                    try v.setRegisters(kernelRegs(index: UInt64(i), calls: UInt64(calls)))
                }
                let failure = Mutex<String?>(nil)
                let t0 = Monitor.now()
                let threads = vs.map { v in
                    HostThread {
                        do throws(NPTError) { try toHalt(v) } catch { failure.withLock { $0 = "\(error)" } }
                    }
                }
                for th in threads { th.join() }
                let wall = Monitor.now() &- t0
                if let f = failure.withLock({ $0 }) { throw NPTError(.state, f) }
                return wall
            }
            let a = try libraryWall(cpus: 1), b = try libraryWall(cpus: 2)
            lib1.append(a); lib2.append(b)
            libRatios.append(2 * Double(a) / Double(b))
            var w1: UInt64 = 0, w2: UInt64 = 0
            try check(rawSyscalls(1, Int32(calls), 1, 1, nil, &w1), "raw system calls, one vCPU")
            try check(rawSyscalls(2, Int32(calls), 1, 1, nil, &w2), "raw system calls, two vCPUs")
            rawRatios.append(2 * Double(w1) / Double(w2))
        }
        // The host's own headroom in the same run: a CPU-bound loop on one thread against two.
        var spinRatios: [Double] = []
        for _ in 0..<reps {
            @Sendable func spin() { var x: UInt64 = 0; for i in 0..<UInt64(quick ? 20_000_000 : 100_000_000) { x = x &+ i; blackHole(x) } }
            let t0 = Monitor.now()
            spin()
            let one = Monitor.now() &- t0
            let t1 = Monitor.now()
            let ths = [HostThread { spin() }, HostThread { spin() }]
            for th in ths { th.join() }
            spinRatios.append(2 * Double(one) / Double(Monitor.now() &- t1))
        }
        print("   Two vCPUs in different hierarchies at once (each \(calls) MBEC system calls; \(reps) repetitions): total throughput")
        print("   \(spreadRatio(libRatios)) one vCPU alone through NPTKit (one vCPU: \(spread(lib1.map { $0 / UInt64(calls) })) per call;")
        print("   two: \(spread(lib2.map { $0 / UInt64(2 * calls) })) per call of either); the raw two-VM loop on the same two vCPU ids,")
        print("   same run: \(spreadRatio(rawRatios)); a CPU-bound host loop on two threads against one: \(spreadRatio(spinRatios))")
        print("   (what this machine's load leaves for a second thread).")

        // 4. The privileged-mode region: entering and leaving the mode, one vCPU, raised from its own thread.
        do {
            var heartbeats: UInt64 = 0, entryOffset: UInt64 = 0, countOffset: UInt64 = 0
            var region = nptk_guest(bytes: nil, length: 0, base: 0, cr3: 0)
            let loop = nptk_guest_priv(&heartbeats, &region, &entryOffset, &countOffset)
            let vm = try NPTKitRuntime.makeVM(config: VMConfig(ramSize: 0xA0000, defaultPermissions: [.read, .write], mbecMode: .lazy,
                                                               backendName: "kvm"), registry: registry)
            defer { try? NPTKitRuntime.destroyVM(vm) }
            _ = try vm.setPolicy(PolicyRange(start: GPA(loop.base), size: 0x1000, pageSize: .size4K, permissions: .all))
            try vm.writeMemory(GPA(loop.base), UnsafeRawBufferPointer(start: loop.bytes, count: loop.length))
            try vm.defineRegion(start: GPA(region.base), size: UInt64(region.length),
                                contents: Array(UnsafeRawBufferPointer(start: region.bytes, count: region.length)), entryOffset: entryOffset)
            let v = try vm.makeVCPU(index: 0)
            var r = Registers()
            r.rip = loop.base; r.rflags = 2; r.gpr[3] = heartbeats; r.gpr[4] = 0x8000
            try v.setRegisters(r)
            func runTo(_ port: UInt32) throws {
                while true {
                    let x = try v.run()
                    if x.reason == .io && x.ioPort == port { return }
                    guard x.reason == .io else { throw NPTError(.state, "privileged mode: unexpected exit \(x)") }
                }
            }
            try runTo(0x10)
            var enter: [UInt64] = []
            let iterations = quick ? 30 : 200
            typealias RegionStatsFn = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?,
                                                      UnsafeMutablePointer<UInt64>?) -> Void
            typealias RegionTimesFn = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void
            let regionStats = pluginSymbol(plugin, "npt_kvm_region_stats").map { unsafeBitCast($0, to: RegionStatsFn.self) }
            let regionTimes = pluginSymbol(plugin, "npt_kvm_region_times").map { unsafeBitCast($0, to: RegionTimesFn.self) }
            func regionNumbers() -> (adds: UInt64, removes: UInt64, addNs: UInt64, removeNs: UInt64) {
                var a: UInt64 = 0, r: UInt64 = 0, u: UInt64 = 0, an: UInt64 = 0, rn: UInt64 = 0
                regionStats?(&a, &r, &u)
                regionTimes?(&an, &rn)
                return (a, r, an, rn)
            }
            let g0 = regionNumbers()
            for _ in 0..<iterations {
                let t0 = Monitor.now()
                try v.raisePrivileged()
                try runTo(0x20)
                enter.append(Monitor.now() &- t0)
                try runTo(0x10)
            }
            let g1 = regionNumbers()
            var line = "   Privileged mode, one vCPU raising on its own thread (\(iterations) entries): raise -> the handler's first OUT "
                + "\(spread(enter)) = \(fmt(Double(Bench.percentile(enter, 0.5)) / libExit))x the exit round trip (the core saves the"
                + " state and sets the entry state, the vCPU moves into the region's view, the handler runs emulated to its OUT)"
            if g1.adds > g0.adds && g1.removes > g0.removes {
                let add = Double(g1.addNs - g0.addNs) / Double(g1.adds - g0.adds)
                let remove = Double(g1.removeNs - g0.removeNs) / Double(g1.removes - g0.removes)
                line += "; the move into the region's view (\(g1.adds - g0.adds) entries) \(nanos(UInt64(add))) (mean) = \(fmt(add / libExit))x"
                    + " the exit round trip, the move out \(nanos(UInt64(remove))) = \(fmt(remove / libExit))x (no memslot update; the"
                    + " region's memslot was added and deleted per entry before: 11 + 17-43 us when the machine is quiet, an SRCU grace"
                    + " period each, 0.5-2 ms under load)"
            }
            print(line + ".")
        }
        // Raw MMIO write exit, for the vFHA line below.
        var mmio = [UInt64](repeating: 0, count: n)
        try check(rawExit(Int32(n), 1, &mmio), "raw MMIO exit loop")
        print("")
        return mmio
    }
}
