import ArgumentParser
import CKVMGuests
import NPTCore
import NPTKit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// `nptkit-cli demo --backend kvm`: the demo's three scenarios on the KVM backend plugin, with the
/// plugin's real x86-64 guests (Plugins/KVM/Guest: kernel.S, priv.S, pmem.S) instead of the
/// simulator's ISA. The same observable outcomes as the simulator demo, within this KVM's limits
/// (Plugins/KVM/README.md): lazy MBEC only, the CPU's own structures executable, no power cut.
extension Demo {
    static let kvmCR0Long: UInt64 = 0x8001_0033   // PG WP NE ET MP PE

    func kvmLongMode(rip: UInt64, cr3: UInt64) -> Registers {
        var r = Registers()
        r.rip = rip; r.rflags = 2; r.gpr[4] = 0x8000
        r.cr0 = Demo.kvmCR0Long; r.cr3 = cr3; r.cr4 = 0x20; r.efer = 0x500
        return r
    }

    /// An extra export of the loaded KVM plugin (e.g. npt_kvm_region_stats), or nil.
    func kvmPluginSymbol(_ name: String) -> UnsafeMutableRawPointer? {
        var paths = options.plugin
        if let dir = executableDirectory() { paths.append(dir + "/libnptkit-kvm.so") }
        for p in paths {
            if let h = dlopen(p, RTLD_NOW | RTLD_NOLOAD), let f = dlsym(h, name) { return f }
        }
        return nil
    }

    func runKVM(registry: BackendRegistry) throws {
        if let m = mode, m != .lazy {
            throw ValidationError("demo --backend kvm runs mode lazy (its MBEC section shows every mode's outcome on the attack): exact needs an exit on the return to user mode, which this KVM lacks")
        }
        // A clear failure where /dev/kvm is unusable (the plugin reports why at the first VM).
        if access("/dev/kvm", R_OK | W_OK) != 0 {
            fail("demo: backend 'kvm' needs read and write access to /dev/kvm: \(errnoText())")
        }
        do {
            try NPTKitRuntime.destroyVM(try NPTKitRuntime.makeVM(
                config: VMConfig(ramSize: 2 << 20, defaultPermissions: .all, mbecMode: .lazy, backendName: "kvm"), registry: registry))
        } catch {
            fail("demo: backend 'kvm' cannot create a VM on /dev/kvm here: \(error)")
        }
        print("NPTKit demo: emulated mode-based execute control on backend 'kvm' (real x86-64 guests on /dev/kvm), mode lazy\n")
        try kvmMBECSection(registry: registry)
        try kvmEntryAttackSection(registry: registry)
        try kvmPrivilegedSection(registry: registry)
        try kvmNVDIMMSection(registry: registry)
    }

    // MARK: MBEC

    struct KernelRun {
        var printed: [UInt8] = []
        var last: VMExit
        var stats: VMStatistics
        /// With injectVE: the reported violation (the guest then got #VE) and the faults the guest
        /// kernel's stubs reported (vector on port 0xEF, rip from the exception frame on its stack).
        var violation: VMExit? = nil
        var faultsSeenByGuest: [(vector: UInt64, rip: UInt64)] = []
    }

    /// injectVE: after a reported MBEC violation the VMM injects #VE (vector 20) and runs on, as the
    /// simulator's demo does; the guest kernel's vector-20 stub reports it on port 0xEF and halts.
    func kernelRun(registry: BackendRegistry, calls: Int, probe: UInt64, injectVE: Bool = false) throws -> KernelRun {
        var entry: UInt64 = 0, kcode: UInt64 = 0, kstack: UInt64 = 0, kfunc: UInt64 = 0, ucode: UInt64 = 0, ustack: UInt64 = 0
        let kernel = nptk_guest_kernel(&entry, &kcode, &kstack, &kfunc, &ucode, &ustack)
        let vm = try NPTKitRuntime.makeVM(config: VMConfig(ramSize: 2 << 20, defaultPermissions: .all, mbecMode: .lazy, backendName: "kvm"),
                                          registry: registry)
        defer { try? NPTKitRuntime.destroyVM(vm) }
        try vm.writeMemory(GPA(kernel.base), UnsafeRawBufferPointer(start: kernel.bytes, count: kernel.length))
        // The CPU's own structures (page tables, GDT/IDT/TSS, kernel stack) keep the default R|W|SX|UX.
        try vm.setPolicy(kvmKernelPolicy(kcode: kcode, kfunc: kfunc, ucode: ucode, ustack: ustack).map(\.0))
        let v = try vm.makeVCPU(index: 0)
        var r = kvmLongMode(rip: entry, cr3: kernel.cr3)
        r.gpr[14] = UInt64(calls); r.gpr[15] = probe
        try v.setRegisters(r)
        var printed: [UInt8] = []
        var violation: VMExit?
        var faults: [(vector: UInt64, rip: UInt64)] = []
        while true {
            let x = try v.run()
            if x.reason == .io && x.ioPort == 0xE9 { printed.append(UInt8(truncatingIfNeeded: x.ioValue)); continue }
            if x.reason == .kicked || x.reason == .budget { continue }
            if injectVE && x.reason == .mbecViolation && violation == nil {
                violation = x
                try v.injectFault(vector: 20, errorCode: x.qualification, address: x.gpa.raw)
                continue
            }
            if injectVE && x.reason == .io && x.ioPort == 0xEF {
                // kernel.S's stub: pushq $vector; pop %rax; out %al, $0xEF: the frame's rip is at rsp
                var rip: UInt64 = 0
                let rsp = try v.registers().gpr[4]
                try withUnsafeMutableBytes(of: &rip) { b in try vm.readMemory(GPA(rsp), b) }
                faults.append((x.ioValue, rip))
                continue
            }
            return KernelRun(printed: printed, last: x, stats: vm.statistics(), violation: violation, faultsSeenByGuest: faults)
        }
    }

    /// Issue 9's attack on the KVM guest kernel, in every mode: ret2dir through the IDT (a PTE making
    /// linear 0xB000 a supervisor-mode alias of the user page, IDT vector 3 - the guest's system call -
    /// pointed at 0xB800, where the user's "JIT" bytes print 'P' and halt).
    func kvmEntryAttackSection(registry: BackendRegistry) throws {
        print("\n--- ret2dir through the IDT, in every mode ---")
        print("An attacker with a kernel data write makes two guest-memory writes: a PTE making linear 0xB000 a")
        print("supervisor-mode alias of the user page 0x9000 (R Xu: user-execute only), and IDT vector 3 (the system")
        print("call) pointed at 0xB800, where the user's JIT bytes print 'P'. Hardware MBEC refuses the kernel's first fetch.\n")
        var entry: UInt64 = 0, kcode: UInt64 = 0, kstack: UInt64 = 0, kfunc: UInt64 = 0, ucode: UInt64 = 0, ustack: UInt64 = 0
        let kernel = nptk_guest_kernel(&entry, &kcode, &kstack, &kfunc, &ucode, &ustack)
        var t = Table(["backend", "mode", "outcome"])
        var promisesKept = true
        for mode in VMConfig.MBECMode.allCases {
            let outcome: String
            do {
                let vm = try NPTKitRuntime.makeVM(config: VMConfig(ramSize: 2 << 20, defaultPermissions: .all, mbecMode: mode,
                                                                   backendName: "kvm"), registry: registry)
                defer { try? NPTKitRuntime.destroyVM(vm) }
                try vm.writeMemory(GPA(kernel.base), UnsafeRawBufferPointer(start: kernel.bytes, count: kernel.length))
                try vm.setPolicy(kvmKernelPolicy(kcode: kcode, kfunc: kfunc, ucode: ucode, ustack: ustack).map(\.0))
                // The attacker's two writes (kernel.S: PT at 0x4000, IDT at 0x5200), and the JIT bytes.
                let alias: UInt64 = ucode | 3
                try withUnsafeBytes(of: alias) { try vm.writeMemory(GPA(0x4000 + 8 * 0xB), $0) }
                let h: UInt64 = 0xB800
                let gate: [UInt64] = [(h & 0xFFFF) | (0x10 << 16) | (0xEE << 40) | (((h >> 16) & 0xFFFF) << 48), 0]
                try gate.withUnsafeBytes { try vm.writeMemory(GPA(0x5200 + 3 * 16), $0) }
                try vm.writeMemory(GPA(ucode + 0x800), bytes: [0xB0, UInt8(ascii: "P"), 0xE6, 0xE9, 0xF4, 0xEB, 0xFE])
                let v = try vm.makeVCPU(index: 0)
                var r = kvmLongMode(rip: entry, cr3: kernel.cr3)
                r.gpr[14] = 2; r.gpr[15] = 0
                try v.setRegisters(r)
                var ran: VMExit?, stopped: VMExit?
                loop: for _ in 0..<10_000 {
                    let x = try v.run()
                    switch x.reason {
                    case .io where x.ioPort == 0xE9 && x.ioValue == UInt64(UInt8(ascii: "P")): ran = x; break loop
                    case .io, .kicked, .budget: continue
                    case .mbecViolation: stopped = x; break loop
                    default: break loop
                    }
                }
                if let x = stopped {
                    outcome = "stopped: MBEC violation at \(hex(x.gpa.raw)), cpl \(x.cpl), rip \(hex(x.rip)), \(policyText(x.violation)) "
                        + "(\(vm.statistics().exitsEscalation) escalation exit)"
                    if mode == .violationOnly { promisesKept = false }
                } else if let x = ran {
                    outcome = "RAN the JIT bytes ('P') at cpl \(x.cpl), rip \(hex(x.rip)), under the \(x.hierarchy) hierarchy"
                        + (mode == .violationOnly ? " (the gap this mode names)" : "")
                    if mode != .violationOnly { promisesKept = false }
                } else {
                    outcome = "neither ran nor was stopped"
                    promisesKept = false
                }
            } catch let error as NPTError where error.code == .guarantee {
                let missing = registry.all.first { $0.name == "kvm" }.map { mode.requiredCapabilities.subtracting($0.capabilities) } ?? []
                outcome = "refused up front (NPT_ERR_GUARANTEE): no \(missing.shortNames.joined(separator: ", "))"
            }
            t.add(["kvm", mode.description, outcome])
        }
        print(t.render())
        print("Every mode kept its promise: \(promisesKept ? "yes" : "NO") (exact is refused: no exit on return; lazy stops it through its escalation exit; violation-only names it as its gap)")
    }

    func kvmKernelPolicy(kcode: UInt64, kfunc: UInt64, ucode: UInt64, ustack: UInt64) -> [(PolicyRange, String)] {
        func page(_ a: UInt64, _ p: EPTPermissions) -> PolicyRange {
            PolicyRange(start: GPA(a), size: 0x1000, pageSize: .size4K, permissions: p)
        }
        return [
            (page(kcode, [.read, .supervisorExecute]), "kernel code"),
            (page(kfunc, [.read, .supervisorExecute]), "kernel code the guest's page tables map user-accessible"),
            (page(ucode, [.read, .userExecute]), "user code"),
            (page(ustack, [.read, .write]), "user stack"),
        ]
    }

    func kvmMBECSection(registry: BackendRegistry) throws {
        var entry: UInt64 = 0, kcode: UInt64 = 0, kstack: UInt64 = 0, kfunc: UInt64 = 0, ucode: UInt64 = 0, ustack: UInt64 = 0
        _ = nptk_guest_kernel(&entry, &kcode, &kstack, &kfunc, &ucode, &ustack)
        print("Guest (Plugins/KVM/Guest/kernel.S): a 64-bit kernel and a user process making 'write' system calls")
        print("(INT3 in, IRETQ back). Policy (EPT bits R W Xs Xu); the rest of RAM, including the CPU's own structures")
        print("(page tables, GDT/IDT/TSS, kernel stack), stays R W Xs Xu: this KVM cannot complete the CPU's accesses to")
        print("them otherwise (a limit of this KVM, Plugins/KVM/README.md):")
        var p = Table(["guest-physical", "what", "policy"])
        for (r, what) in kvmKernelPolicy(kcode: kcode, kfunc: kfunc, ucode: ucode, ustack: ustack) {
            p.add([hex(r.range.start.raw), what, r.permissions.description])
        }
        print(p.render())
        print("Mode lazy: every entry to the kernel from user mode is an escalation exit (the plugin keeps the guest's IDT")
        print("page out of the user layout, so the event stops before delivery) that exposes the supervisor hierarchy; the")
        print("user one is exposed after a fetch violation (KVM has no exit on the return). Exact mode needs that exit too:")
        print("refused on this backend.")

        let run = try kernelRun(registry: registry, calls: syscalls, probe: 0)
        guard run.last.reason == .halt else { throw NPTError(.state, "kernel guest: unexpected exit \(run.last)") }
        print("\nGuest output (system call 'write'): \(String(decoding: run.printed, as: UTF8.self).map(String.init).joined(separator: " "))")

        print("\nViolations stopped (reported to the VMM with an EPT-violation qualification, then injected as #VE with")
        print("npt_vcpu_inject_fault: KVM_SET_VCPU_EVENTS, delivered through the guest kernel's IDT):")
        var v = Table(["#", "attempt", "cpl", "guest-physical", "access", "policy of page", "qualification"])
        var ran = 0
        var faults: [(vector: UInt64, rip: UInt64)] = []
        for (i, probe) in [UInt64(1), 2].enumerated() {
            let o = try kernelRun(registry: registry, calls: 2, probe: probe, injectVE: true)
            faults += o.faultsSeenByGuest
            if o.printed.contains(UInt8(ascii: "K")) { ran += 1 }
            guard let x = o.violation else {
                v.add(["\(i + 1)", probe == 1 ? "user jumps into kernel page" : "kernel jumps into user page", "-", "-", "-", "-",
                       "NOT STOPPED: \(o.last)"])
                ran += 1
                continue
            }
            let q = x.violation
            let who = x.cpl == 3 ? "user runs a supervisor-only page" : "kernel runs a user page"
            v.add(["\(i + 1)", who, "\(x.cpl)", hex(x.gpa.raw),
                   q.contains(.fetch) ? "fetch" : q.contains(.write) ? "write" : "read",
                   policyText(q), hex(q.rawValue)])
        }
        print(v.render())
        print("Attacks that ran guest code: \(ran)   Faults the guest kernel saw: \(faults.map { "vector \($0.vector) at \(hex($0.rip))" }.joined(separator: ", "))")

        let s = run.stats
        print("\nExits by reason (the \(syscalls) system calls):")
        var e = Table(["reason", "count", "handled by"])
        e.add(["escalation (user -> supervisor)", "\(s.exitsEscalation)", "none on KVM (no exit on a privilege change)"])
        e.add(["return to user", "\(s.exitsReturnToUser)", "none on KVM"])
        e.add(["EPT violation", "\(s.exitsEPTViolation)", "core: switch, or report (\(s.violationsReported) reported)"])
        e.add(["IO (guest output)", "\(run.printed.count)", "VMM"])
        e.add(["halt", "1", "VMM"])
        print(e.render())
        print("Hierarchy switches: \(s.hierarchySwitches)   Exits in all: \(s.exitsTotal)")

        let longer = try kernelRun(registry: registry, calls: syscalls + 100, probe: 0)
        let perCall = Double(mbecExits(longer.stats) - mbecExits(s)) / 100
        print("Exits per system-call round trip: \(fmt(perCall)) (mode lazy: a fetch violation on entering the kernel and one")
        print("on returning to user; exact mode would need 1, the escalation, with an exit KVM does not have)")
    }

    // MARK: privileged mode

    func kvmPrivilegedSection(registry: BackendRegistry) throws {
        let cpus = 2
        print("\n--- Privileged mode (SMM-like) with a secure global view ---")
        print("\(cpus) vCPUs on their own threads run Plugins/KVM/Guest/priv.S (16-bit real mode): each bumps a heartbeat and")
        print("reads the special region's first dword (legacy SMRAM, 0xA0000) in a loop. The main thread raises enter-mode")
        print("requests, one at a time and then on every vCPU at once. The region's handler (16-bit, entered like SMM)")
        print("checks that no heartbeat moves while it runs, counts its entry, and returns with RSM.\n")
        var heartbeats: UInt64 = 0, entryOffset: UInt64 = 0, countOffset: UInt64 = 0
        var region = nptk_guest(bytes: nil, length: 0, base: 0, cr3: 0)
        let loop = nptk_guest_priv(&heartbeats, &region, &entryOffset, &countOffset)
        let vm = try NPTKitRuntime.makeVM(config: VMConfig(ramSize: 0xA0000, defaultPermissions: [.read, .write], mbecMode: .lazy,
                                                           backendName: "kvm"), registry: registry)
        defer { try? NPTKitRuntime.destroyVM(vm) }
        // Real mode (paging off): every address is user-mode, so the loop needs Xu (and Xs for
        // the CPL-0 hierarchy the lazy mode's CPL rule would pick if the core did not know).
        try vm.setPolicy(PolicyRange(start: GPA(loop.base), size: 0x1000, pageSize: .size4K,
                                     permissions: .all))
        try vm.writeMemory(GPA(loop.base), UnsafeRawBufferPointer(start: loop.bytes, count: loop.length))
        try vm.defineRegion(start: GPA(region.base), size: UInt64(region.length),
                            contents: Array(UnsafeRawBufferPointer(start: region.bytes, count: region.length)), entryOffset: entryOffset)
        var vcpus: [VirtualCPU] = []
        for i in 0..<cpus {
            let c = try vm.makeVCPU(index: UInt32(i))
            var r = Registers()
            r.rip = loop.base; r.rflags = 2; r.gpr[3] = heartbeats + 4 * UInt64(i); r.gpr[4] = 0x8000
            try c.setRegisters(r)
            vcpus.append(c)
        }
        typealias RegionStats = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void
        let regionStats = kvmPluginSymbol("npt_kvm_region_stats").map { unsafeBitCast($0, to: RegionStats.self) }
        var adds0: UInt64 = 0, removes0: UInt64 = 0, unbacked0: UInt64 = 0
        regionStats?(&adds0, &removes0, &unbacked0)

        struct Seen: Sendable { var heartbeatOUTs = 0; var leaks = 0; var moved = 0; var counts: [UInt64] = []; var wrongIndex = 0 }
        let done = Atomic<Bool>(false)
        let served = Atomic<Int>(0)
        let seen = Mutex(Seen())
        let failure = Mutex<String?>(nil)
        var threads: [HostThread] = []
        for c in vcpus {
            threads.append(HostThread {
                var local = Seen()
                do throws(NPTError) {
                    while !done.load(ordering: .acquiring) {
                        let x = try c.run()
                        switch x.reason {
                        case .kicked, .budget: continue
                        case .io:
                            switch x.ioPort {
                            case 0x10:
                                local.heartbeatOUTs += 1
                                if x.ioValue & 0xFF != 0xFF { local.leaks += 1 }
                            case 0x11: local.leaks += 1
                            case 0x20: if UInt32(truncatingIfNeeded: x.ioValue) != c.index { local.wrongIndex += 1 }
                            case 0x21: if UInt32(truncatingIfNeeded: x.ioValue) != 0 { local.moved += 1 }
                            case 0x22:
                                local.counts.append(x.ioValue & 0xFFFF_FFFF)
                                served.add(1, ordering: .acquiringAndReleasing)
                            default: throw NPTError(.state, "vCPU \(c.index): OUT \(hex(UInt64(x.ioPort))) = \(hex(x.ioValue))")
                            }
                        default: throw NPTError(.state, "vCPU \(c.index): unexpected exit \(x)")
                        }
                    }
                } catch {
                    failure.withLock { $0 = $0 ?? "\(error)" }
                    done.store(true, ordering: .releasing)
                }
                seen.withLock { s in
                    s.heartbeatOUTs += local.heartbeatOUTs; s.leaks += local.leaks; s.moved += local.moved
                    s.counts += local.counts; s.wrongIndex += local.wrongIndex
                }
            })
        }
        func waitServed(_ n: Int) -> Bool {
            let deadline = Monitor.now() + 10_000_000_000
            while served.load(ordering: .acquiring) < n && Monitor.now() < deadline && !done.load(ordering: .acquiring) {
                sleepNanos(200_000)
            }
            return served.load(ordering: .acquiring) >= n
        }
        sleepNanos(30_000_000)
        var total = 0
        var ok = true
        do {
            // Two one at a time, then two bursts on every vCPU at once (the requests race; the core serializes them).
            for k in 0..<2 where ok {
                try vcpus[k % cpus].raisePrivileged(); total += 1
                ok = waitServed(total); sleepNanos(3_000_000)
            }
            for _ in 0..<2 where ok {
                for c in vcpus { try c.raisePrivileged(); total += 1 }
                ok = waitServed(total); sleepNanos(3_000_000)
            }
            sleepNanos(10_000_000)
        } catch {
            failure.withLock { $0 = $0 ?? "\(error)" }
        }
        done.store(true, ordering: .releasing)
        for t in threads { t.join() }
        if let f = failure.withLock({ $0 }) { throw NPTError(.state, "privileged-mode scenario: \(f)") }
        if !ok { throw NPTError(.state, "privileged-mode scenario: \(served.load(ordering: .acquiring)) of \(total) requests served in 10 s") }

        let o = seen.withLock { $0 }
        let records = vm.privileged.entryRecords
        let stats = vm.privileged.statistics
        let t0 = records.map(\.raisedAt).min() ?? 0
        var t = Table(["#", "vCPU", "requested at", "entered at", "left at", "others stopped for", "handler count"])
        let counts = o.counts.sorted()
        for (k, r) in records.enumerated() {
            t.add(["\(k + 1)", "\(r.cpu)", micros(r.raisedAt - t0), micros(r.enteredAt - t0), micros(r.leftAt - t0),
                   micros(r.othersStopped), k < counts.count ? "\(counts[k])" : ""])
        }
        print(t.render())
        var beats: [UInt32] = []
        for i in 0..<cpus { beats.append(UInt32(truncatingIfNeeded: try readGuest64(vm, heartbeats + 4 * UInt64(i)))) }
        let probes = beats.reduce(UInt64(0)) { $0 + UInt64($1) }
        var answered = ""
        if let f = regionStats {
            var a: UInt64 = 0, r: UInt64 = 0, u: UInt64 = 0
            f(&a, &r, &u)
            answered = "; answered all ones (open bus): \(u - unbacked0); region memslot added \(a - adds0), removed \(r - removes0) times"
        }
        print("Entries \(stats.entries) of \(stats.requests) requests, failures \(stats.failures); reads of the region from outside the mode: \(probes - UInt64(o.leaks)) blocked, \(o.leaks) succeeded")
        print("Heartbeats that moved while the region was visible: \(o.moved); heartbeats in RAM: \(beats.map(String.init).joined(separator: " ")) (\(o.heartbeatOUTs) heartbeat OUTs)")
        print("The region is a memslot present only while a vCPU holds the mode\(answered)")
        if o.wrongIndex > 0 { print("WARNING: the handler was entered with a wrong vCPU index \(o.wrongIndex) times") }
    }

    // MARK: NVDIMM

    func kvmNVDIMMSection(registry: BackendRegistry) throws {
        let records: UInt64 = 4
        let nvdimm: UInt64 = 0x4000_0000
        print("\n--- Virtualized NVDIMM WPQ flushing ---")
        print("The guest (Plugins/KVM/Guest/pmem.S) makes each of \(records) records durable by the documented protocol: store,")
        print("write-back, SFENCE, then a write to the virtual flush hint address (vFHA). The write-back is CLFLUSHOPT:")
        print("this KVM's instruction emulator lacks CLWB. The NVDIMM range is backed by the plugin's host file; its")
        print("physical flush is an msync of that file. Where the host region needs flushing the vFHA is a read-only")
        print("memslot: the write exits and the core flushes before resuming the guest. Where it does not, the vFHA is")
        print("plain memory: no exit. (The plugin reads NPTKIT_KVM_PMEM_NEEDS_FLUSH at the VM's first NVDIMM call.)\n")
        var flushEntry: UInt64 = 0
        let pmem = nptk_guest_pmem(&flushEntry)
        let saved = getenv("NPTKIT_KVM_PMEM_NEEDS_FLUSH").map { String(cString: $0) }
        defer {
            if let s = saved { setenv("NPTKIT_KVM_PMEM_NEEDS_FLUSH", s, 1) } else { unsetenv("NPTKIT_KVM_PMEM_NEEDS_FLUSH") }
        }
        var t = Table(["host file region", "vFHA trapped", "flush exits", "guest flushes", "physical flushes (msync)",
                       "records announced", "records read back"])
        for needs in [true, false] {
            setenv("NPTKIT_KVM_PMEM_NEEDS_FLUSH", needs ? "1" : "0", 1)
            let vm = try NPTKitRuntime.makeVM(config: VMConfig(ramSize: 2 << 20, defaultPermissions: .all, mbecMode: .lazy, backendName: "kvm"),
                                              registry: registry)
            defer { try? NPTKitRuntime.destroyVM(vm) }
            try vm.addNVDIMM(gpa: GPA(nvdimm), size: 2 << 20, hostRegion: 1, regionOffset: 0)
            guard let vfha = vm.virtualFlushHint else { throw NPTError(.state, "no vFHA") }
            // The plugin's backing file (zero-filled, one per process) outlives the VM: each configuration
            // writes its records to lines of its own, so what is read back is this run's.
            let base = nvdimm + (needs ? 0 : 0x1000)
            try vm.writeMemory(GPA(pmem.base), UnsafeRawBufferPointer(start: pmem.bytes, count: pmem.length))
            let v = try vm.makeVCPU(index: 0)
            var r = kvmLongMode(rip: flushEntry, cr3: pmem.cr3)
            r.gpr[7] = base; r.gpr[6] = vfha.raw; r.gpr[1] = records
            try v.setRegisters(r)
            var outs: UInt64 = 0
            while true {
                let x = try v.run()
                if x.reason == .io && x.ioPort == 0xE9 { outs += 1; continue }
                if x.reason == .kicked || x.reason == .budget { continue }
                guard x.reason == .halt else { throw NPTError(.state, "pmem guest: unexpected exit \(x)") }
                break
            }
            var intact = 0
            for k in 0..<records {
                let line = base + 64 * k
                if try readGuest64(vm, line) == 0x4e56_444d_4d2d_4b56, try readGuest64(vm, line + 8) == k { intact += 1 }
            }
            let f = vm.flushStatistics()
            t.add([needs ? "needs flushing" : "needs no flushing", vm.flushHintTrapped ? "yes" : "no", "\(f.exits)",
                   "\(f.guestFlushes)", "\(f.physicalFlushes)", "\(outs)", "\(intact)/\(records)"])
        }
        print(t.render())
        print("No power cut on KVM: a power failure is unsupported on this backend (the plugin has no power_failure),")
        print("so the simulator's survival columns and crash checker do not apply; the records are read back above.")
    }
}
