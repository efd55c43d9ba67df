import ArgumentParser
import CNPTKit
import NPTCore
import NPTKit
import NPTScenarios
import NPTSimulator
import Synchronization
import NPTHost

/// `nptkit bench`: the speed and memory figures of the README. Every figure is a median over
/// repetitions measured in this one run, and ratios are taken between figures of the same run.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Measure the figures quoted in the README (medians of one run).")
    @Flag(help: "Fewer repetitions (a smoke run, e.g. in CI).")
    var quick = false
    @Option(help: "Run only these groups: build, update, sim, exits, abi, privileged, nvdimm, kvm, trace, replay, calltrace.")
    var only: [String] = []
    @Option(help: "nvdimm group: the simulated platform's flush hint drain time (the writing CPU spins this long), ns.")
    var flushLatencyNs: UInt64 = 1000
    @Option(name: .customLong("backend-opt"), help: ArgumentHelp("kvm group: an argument for the kvm plugin (KEY=VALUE; repeatable), e.g. pmem-dir=/dev/shm.", valueName: "key=value"))
    var backendOpt: [String] = []
    @Option(help: .private)
    var replayChild: String?
    @Option(help: .private)
    var replayChildSyscalls: Int = 0
    @Option(help: .private)
    var replayRecord: String?
    @Option(name: .customLong("replay-record-vms"), help: .private)
    var replayRecordVMs: Int = 1

    func wants(_ g: String) -> Bool { only.isEmpty || only.contains(g) }

    func run() throws {
        if let replayChild { return try Bench.replayChild(replayChild, syscalls: replayChildSyscalls) }
        if let replayRecord { return try Bench.recordHVCIRuns(replayRecord, syscalls: replayChildSyscalls, vms: replayRecordVMs) }
        print("NPTKit benchmarks (\(quick ? "quick" : "full") run; medians; \(isDebugBuild ? "DEBUG build: use -c release for figures" : "release build"))\n")
        if wants("build") { try benchBuild() }
        if wants("update") { try benchUpdate() }
        if wants("sim") { try benchSimulator() }
        if wants("exits") { try benchExits() }
        if wants("abi") { try benchABI() }
        if wants("privileged") { try benchPrivileged() }
        if wants("nvdimm") { try benchNVDIMM() }
        if wants("kvm") { try benchKVM() }
        if wants("trace") { try benchTrace() }
        if wants("replay") { try benchReplay() }
        if wants("calltrace") { try benchCallTrace() }
    }

    // MARK: 1. shadow hierarchy build

    enum Placement: String, CaseIterable { case random, clustered, adversarial }

    /// 10,000 executable regions of 4-64 KiB in a 64 GiB guest. `random`: anywhere, kinds mixed
    /// (45% Xs, 45% Xu, 10% both); `clustered`: kernel code (Xs) in the first GiB, user code (Xu)
    /// elsewhere, as an OS lays them out; `adversarial`: every 2 MiB block that holds a region holds an
    /// Xs-only and an Xu-only one, the worst case for sharing.
    static func regions(_ placement: Placement, count: Int, guest: UInt64, seed: UInt64) -> [PolicyRange] {
        var rng = SplitMix64(seed: seed)
        var out: [PolicyRange] = []
        out.reserveCapacity(count)
        let pages = guest >> 12
        for i in 0..<count {
            let len = (1 + rng.next() % 16) << 12
            var start: UInt64
            var perms: EPTPermissions
            switch placement {
            case .random:
                start = (rng.next() % (pages - 16)) << 12
                let k = rng.next() % 100
                perms = k < 45 ? [.read, .supervisorExecute] : k < 90 ? [.read, .userExecute] : [.read, .supervisorExecute, .userExecute]
            case .clustered:
                let kernel = i % 5 == 0
                start = kernel ? (rng.next() % ((1 << 18) - 16)) << 12 : ((1 << 18) + rng.next() % (pages - (1 << 18) - 16)) << 12
                perms = kernel ? [.read, .supervisorExecute] : [.read, .userExecute]
            case .adversarial:
                // Regions 2k and 2k+1 share a 2 MiB block: one Xs-only, the other Xu-only.
                var pair = SplitMix64(seed: seed ^ UInt64(i / 2))
                let block = pair.next() % (pages >> 9)
                start = (block << 21) + ((i % 2 == 0 ? 0 : 256) << 12)
                perms = i % 2 == 0 ? [.read, .supervisorExecute] : [.read, .userExecute]
            }
            out.append(PolicyRange(start: GPA(start), size: len, pageSize: .size4K, permissions: perms))
        }
        return out
    }

    func benchBuild() throws {
        let guest: UInt64 = 64 << 30
        let reps = quick ? 3 : 7
        print("1. Shadow hierarchy build: 64 GiB guest, 10,000 executable regions (policy tree + both hierarchies)")
        var t = Table(["placement", "build median", "tables (both)", "tables (one)", "memory both / one", "MiB (both)"])
        for p in Placement.allCases {
            let rs = Bench.regions(p, count: 10_000, guest: guest, seed: 42)
            var times: [Duration] = []
            var counts = (all: 0, perHierarchy: [0])
            for _ in 0..<reps {
                var snap: ShadowSnapshot?
                times.append(ContinuousClock().measure {
                    var tree = PolicyTree(ramSize: guest, defaultPermissions: [.read, .write])
                    for r in rs { tree.apply(r) }
                    var b = ShadowBuilder()
                    snap = b.snapshot(of: tree, generation: 1)
                })
                counts = snap!.nodeCounts()
            }
            t.add([p.rawValue, show(median(times)), "\(counts.all)", "\(counts.perHierarchy[0])",
                   fmt(Double(counts.all) / Double(counts.perHierarchy[0]), 3), fmt(Double(counts.all * 4096) / 1048576, 1)])
        }
        print(t.render())
        print("   'one' is the supervisor hierarchy alone, i.e. what a single EPT for this policy needs.\n")
    }

    // MARK: 2. incremental update

    func benchUpdate() throws {
        print("2. Incremental update of one 4 KiB page's policy (VirtualMachine.setPolicy on the simulator, 10,000 regions)")
        var t = Table(["guest size", "update median", "shadow tables rebuilt", "invalidations sent"])
        let sizes: [(String, UInt64)] = [("1 GiB", 1 << 30), ("64 GiB", 64 << 30), ("1 TiB", 1 << 40)]
        let calls = quick ? 500 : 4000
        for (name, size) in sizes {
            let registry = NPTKitRuntime.makeRegistry()
            let vm = try VirtualMachine(config: VMConfig(ramSize: size), registry: registry)
            defer { try? vm.destroy() }
            for r in Bench.regions(.random, count: 10_000, guest: size, seed: 7) { try vm.setPolicy(r) }
            _ = try vm.makeVCPU(index: 0)
            let page = GPA((size / 2) & ~0xFFF)
            var times: [Duration] = []
            let before = vm.statistics().invalidations
            for i in 0..<calls {
                let p: EPTPermissions = i % 2 == 0 ? [.read, .supervisorExecute] : [.read, .write]
                times.append(try ContinuousClock().measure {
                    try vm.setPolicy(PolicyRange(start: page, size: 0x1000, pageSize: .size4K, permissions: p))
                })
            }
            let invs = Double(vm.statistics().invalidations - before) / Double(calls)
            // Tables rebuilt by one update, counted on the bare tree and builder.
            var tree = PolicyTree(ramSize: size, defaultPermissions: [.read, .write])
            for r in Bench.regions(.random, count: 10_000, guest: size, seed: 7) { tree.apply(r) }
            var b = ShadowBuilder()
            _ = b.snapshot(of: tree, generation: 0)
            let built0 = b.nodesBuilt
            tree.apply(PolicyRange(start: page, size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]))
            _ = b.snapshot(of: tree, generation: 1)
            t.add([name, show(median(times)), "\(b.nodesBuilt - built0)", fmt(invs, 1)])
        }
        print(t.render())
        print("   The time and the tables rebuilt do not grow with the guest: an update copies one path of the tree.\n")
    }

    // MARK: 3. simulator throughput

    func benchSimulator() throws {
        print("3. Simulator: guest memory accesses per second (each LOAD = one fetch + one data access)")
        let iterations = quick ? 20_000 : 200_000
        var t = Table(["TLB", "loads", "median time", "accesses / s", "TLB hits", "TLB misses"])
        var rates: [Double] = []
        for cold in [false, true] {
            var times: [Duration] = []
            var stats = VMStatistics()
            for _ in 0..<(quick ? 3 : 5) {
                let (d, s) = try simulatorRun(iterations: iterations, cold: cold)
                times.append(d)
                stats = s
            }
            let m = median(times)
            let rate = Double(iterations * 2) / seconds(m)
            rates.append(rate)
            t.add([cold ? "cold (2-D walk every load)" : "warm", "\(iterations)", show(m), fmt(rate / 1e6, 2) + " M",
                   "\(stats.tlbHits)", "\(stats.tlbMisses)"])
        }
        print(t.render())
        print("   warm / cold: \(fmt(rates[0] / rates[1], 2))x\n")
    }

    /// A loop of `iterations` LOADs; cold: each load touches another of 4096 pages, which the
    /// 256-entry TLB cannot hold, so each is a full two-dimensional walk.
    func simulatorRun(iterations: Int, cold: Bool) throws -> (Duration, VMStatistics) {
        let pagesTouched: UInt64 = 4096
        let ram: UInt64 = 32 << 20
        var img = GuestImage()
        var pt = GuestPageTableBuilder(image: &img, tableArea: GPARange(start: GPA(0), size: 0x10_0000))
        let dataVA: UInt64 = 0x1_0000_0000, codeVA: UInt64 = 0x40_0000
        for i in 0..<pagesTouched {
            try pt.map(&img, gva: dataVA + i * 0x1000, gpa: 0x100_0000 + i * 0x1000, flags: [.present, .writable, .noExecute])
        }
        try pt.map(&img, gva: codeVA, gpa: 0x20_0000, flags: [.present])
        var a = Assembler(origin: codeVA)
        a.load64(2, dataVA)
        a.load64(3, dataVA)
        a.load64(4, pagesTouched * 0x1000)
        a.emit(.movi, 5, 0, Int32(iterations))
        a.emit(.movi, 6, 0, 0x1000)
        let loop = a.here
        a.emit(.load, 0, 2, 0)
        if cold {
            a.emit(.add, 2, 6)                 // next page
            a.emit(.mov, 7, 2); a.emit(.sub, 7, 3); a.emit(.sub, 7, 4)
            a.emit(.jnz, 7, 0, 8)              // wrapped past the last page?
            a.emit(.mov, 2, 3)
        } else {
            a.emit(.nop); a.emit(.nop); a.emit(.nop); a.emit(.nop); a.emit(.nop)
        }
        a.emit(.addi, 5, 0, -1)
        a.jnz(5, to: loop)
        a.emit(.hlt)
        img.write(0x20_0000, a.bytes)
        let vm = try VirtualMachine(config: VMConfig(ramSize: ram), registry: NPTKitRuntime.makeRegistry())
        defer { try? vm.destroy() }
        try vm.setPolicy(PolicyRange(start: GPA(0x20_0000), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]))
        try img.load(into: vm)
        let cpu = try vm.makeVCPU(index: 0)
        var r = Registers()
        r.cr0 = Registers.cr0PG; r.cr3 = pt.cr3; r.efer = Registers.eferNXE; r.rip = codeVA
        try cpu.setRegisters(r)
        var exit = VMExit(reason: .none)
        let d = try ContinuousClock().measure { exit = try cpu.run() }
        guard exit.reason == .halt else { throw NPTError(.state, "benchmark guest ended with \(exit)") }
        return (d, vm.statistics())
    }

    // MARK: 4. exits per system-call round trip

    /// The three policy shapes of issue 9's benchmark, from the demo's HVCI-like policy: as is (both
    /// supervisor-only and user-only code), without supervisor-only pages (every Xs page also Xu), and
    /// without user-only pages (every Xu page also Xs).
    enum PolicyShape: String, CaseIterable {
        case hvci = "HVCI-like (kernel R|Xs, user R|Xu)"
        case noSupervisorOnly = "no supervisor-only pages"
        case noUserOnly = "no user-only pages"
        func apply(_ p: [PolicyRange]) -> [PolicyRange] {
            p.map { r in
                var r = r
                switch self {
                case .hvci: break
                case .noSupervisorOnly: if r.permissions.contains(.supervisorExecute) { r.permissions.insert(.userExecute) }
                case .noUserOnly: if r.permissions.contains(.userExecute) { r.permissions.insert(.supervisorExecute) }
                }
                return r
            }
        }
    }

    func benchExits() throws {
        print("4. Exits per system-call round trip in the demo scenario, per policy shape and mode (difference between 10 and")
        print("   1,010 system calls; simulator; the exits armed only while the policy needs them)")
        var t = Table(["policy", "mode", "exits / round trip", "escalation", "return", "EPT violation", "wall time / round trip"])
        let host = try ScenarioHost(registry: NPTKitRuntime.makeRegistry())
        for shape in PolicyShape.allCases {
            for mode in VMConfig.MBECMode.allCases {
                var times: [Duration] = []
                var a = VMStatistics(), b = VMStatistics()
                func run(_ n: Int) throws -> VMStatistics {
                    try HVCIScenario(syscalls: n).run(host: host, mode: mode, policy: shape.apply).1
                }
                for _ in 0..<(quick ? 3 : 7) {
                    let c = ContinuousClock()
                    let t0 = c.now
                    a = try run(10)
                    let t1 = c.now
                    b = try run(1010)
                    let t2 = c.now
                    times.append((t2 - t1) - (t1 - t0))
                }
                let n = 1000.0
                t.add([shape.rawValue, "\(mode)", fmt(Double(mbecExits(b) - mbecExits(a)) / n),
                       fmt(Double(b.exitsEscalation - a.exitsEscalation) / n), fmt(Double(b.exitsReturnToUser - a.exitsReturnToUser) / n),
                       fmt(Double(b.exitsEPTViolation - a.exitsEPTViolation) / n), show(median(times) / 1000)])
            }
        }
        print(t.render())
        print("   The escalation exit is armed only while the user hierarchy is exposed and the policy has a user-only page,")
        print("   the return exit only while the supervisor one is exposed and it has a supervisor-only page; where an exit is")
        print("   not armed, the first fetch of a page the exposed hierarchy does not execute switches instead (an EPT violation).\n")
    }

    // MARK: 5. C ABI vs Swift

    func benchABI() throws {
        print("5. One policy call through the C ABI against the same call in Swift (batches interleaved)")
        let calls = quick ? 2000 : 20_000
        let batch = 100
        let vm = try VirtualMachine(config: VMConfig(ramSize: 1 << 30), registry: NPTKitRuntime.makeRegistry())
        defer { try? vm.destroy() }
        // The C entry points, called through C function pointers.
        let cSet: @convention(c) (OpaquePointer?, UInt64, UInt64, UInt64, UInt64) -> npt_status = npt_policy_set
        let cGet: @convention(c) (OpaquePointer?, UInt64, UnsafeMutablePointer<UInt64>?) -> npt_status = npt_policy_get
        let (ctx, cvm, _) = try makeCVM()
        defer { _ = npt_vm_destroy(cvm); _ = npt_context_destroy(ctx) }

        var swSet: [Duration] = [], cSetT: [Duration] = [], swGet: [Duration] = [], cGetT: [Duration] = []
        var sink: UInt64 = 0
        for i in 0..<(calls / batch) {
            swSet.append(try ContinuousClock().measure {
                for j in 0..<batch {
                    let p: EPTPermissions = (i + j) % 2 == 0 ? [.read, .supervisorExecute] : [.read, .write]
                    try vm.setPolicy(PolicyRange(start: GPA(0x10_0000), size: 0x1000, pageSize: .size4K, permissions: p))
                }
            } / batch)
            cSetT.append(ContinuousClock().measure {
                for j in 0..<batch { _ = cSet(cvm, 0x10_0000, 0x1000, 0x1000, (i + j) % 2 == 0 ? 5 : 3) }
            } / batch)
            swGet.append(try ContinuousClock().measure {
                for j in 0..<batch { sink &+= try vm.permissions(at: GPA(UInt64(j) << 12)).rawValue }
            } / batch)
            cGetT.append(ContinuousClock().measure {
                var v: UInt64 = 0
                for j in 0..<batch { _ = cGet(cvm, UInt64(j) << 12, &v); sink &+= v }
            } / batch)
        }
        var t = Table(["call", "Swift median", "C ABI median", "C / Swift"])
        t.add(["set one 4 KiB page (npt_policy_set)", show(median(swSet)), show(median(cSetT)),
               fmt(seconds(median(cSetT)) / seconds(median(swSet)))])
        t.add(["read one page's policy (npt_policy_get)", show(median(swGet)), show(median(cGetT)),
               fmt(seconds(median(cGetT)) / seconds(median(swGet)))])
        print(t.render())
        print("   The C path adds a handle lookup (a lock and a dictionary), argument checks and status mapping\n   (checksum \(sink & 1)).\n")
    }
}

extension Bench {
    /// Interrupt-to-entry latency of the privileged mode against a plain barrier that stops and
    /// resumes the same vCPU threads, measured in this run.
    func benchPrivileged() throws {
        print("6. Privileged mode: latency from the enter-mode interrupt to entry, beside a plain stop/resume barrier")
        let counts = [1, 2, 4, 8, 16, 32, 64]
        let samples = quick ? 30 : 200
        var t = Table(["vCPUs", "entry median", "entry p99", "barrier median", "barrier p99", "median ratio"])
        for n in counts {
            let (e50, e99) = try entryLatency(cpus: n, samples: samples)
            let (b50, b99) = try barrierLatency(cpus: n, samples: samples)
            t.add(["\(n)", micros(e50), micros(e99), micros(b50), micros(b99), fmt(Double(e50) / Double(max(1, b50)))])
        }
        print(t.render())
        print("   Entry = stop every other vCPU, add the region to both hierarchies, enter. Barrier = kick the same\n   threads out of the guest, wait until all arrived, release. One request at a time.\n")
    }

    static func percentile(_ xs: [UInt64], _ p: Double) -> UInt64 {
        let s = xs.sorted()
        return s[min(s.count - 1, Int(Double(s.count - 1) * p + 0.5))]
    }

    /// vCPU threads on the scenario's guest (probing RAM instead of the region: no exits).
    func startGuests(_ vm: VirtualMachine, cpus n: Int) throws -> [VirtualCPU] {
        try PrivilegedScenario(cpus: n, requests: 0, probeRegion: false).prepare(vm)
    }

    func entryLatency(cpus n: Int, samples: Int) throws -> (UInt64, UInt64) {
        let vm = try VirtualMachine(config: VMConfig(ramSize: PrivilegedSim.ram, maxStepsPerRun: 20_000),
                                    registry: NPTKitRuntime.makeRegistry())
        defer { try? vm.destroy() }
        let cpus = try startGuests(vm, cpus: n)
        let done = Atomic<Bool>(false)
        let threads = cpus.map { c in HostThread { while !done.load(ordering: .acquiring) { _ = try? c.run() } } }
        sleepNanos(2_000_000)
        for k in 0..<samples {
            let before = vm.privileged.protocolState.served
            try cpus[k % n].raisePrivileged()
            while vm.privileged.protocolState.served == before { sleepNanos(20_000) }
        }
        done.store(true, ordering: .releasing)
        for t in threads { t.join() }
        let lat = vm.privileged.entryRecords.map { $0.enteredAt - $0.raisedAt }
        return (Bench.percentile(lat, 0.5), Bench.percentile(lat, 0.99))
    }

    /// The same path without the protocol: the requester vCPU is interrupted (kicked), its thread
    /// kicks the others and waits on a plain barrier until all have arrived, then releases them.
    func barrierLatency(cpus n: Int, samples: Int) throws -> (UInt64, UInt64) {
        let vm = try VirtualMachine(config: VMConfig(ramSize: PrivilegedSim.ram, maxStepsPerRun: 20_000),
                                    registry: NPTKitRuntime.makeRegistry())
        defer { try? vm.destroy() }
        let cpus = try startGuests(vm, cpus: n)
        let done = Atomic<Bool>(false)
        let monitor = Monitor()
        let gate = BarrierState()
        let threads = cpus.enumerated().map { (i, c) in HostThread {
            while !done.load(ordering: .acquiring) {
                guard let x = try? c.runRaw() else { return }
                guard x.reason == .kicked else { var e = x; _ = try? c.handle(&e); continue }
                monitor.lock()
                if gate.requester == i && !gate.stopping {
                    gate.stopping = true
                    gate.arrived = 0
                    monitor.unlock()
                    for (j, o) in cpus.enumerated() where j != i { o.backend.kick() }
                    monitor.lock()
                    while gate.arrived < n - 1 { _ = monitor.wait(untilNanos: nil) }
                    gate.latencies.append(Monitor.now() - gate.raisedAt)
                    gate.stopping = false
                    gate.requester = -1
                    gate.epoch += 1
                    monitor.broadcast()
                } else if gate.stopping {
                    let epoch = gate.epoch
                    gate.arrived += 1
                    monitor.broadcast()
                    while gate.epoch == epoch { _ = monitor.wait(untilNanos: nil) }
                }
                monitor.unlock()
            }
        } }
        sleepNanos(2_000_000)
        for k in 0..<samples {
            monitor.withLock { gate.requester = k % n; gate.raisedAt = Monitor.now() }
            cpus[k % n].backend.kick()
            while monitor.withLock({ gate.latencies.count }) <= k { sleepNanos(20_000) }
        }
        done.store(true, ordering: .releasing)
        for t in threads { t.join() }
        let lat = monitor.withLock { gate.latencies }
        return (Bench.percentile(lat, 0.5), Bench.percentile(lat, 0.99))
    }
}

extension Bench {
    /// Virtualized NVDIMM WPQ flushing: the raw physical flush, then guest flushes (exit to resume)
    /// from 1-16 vCPU threads flushing at once, with and without coalescing, and the ADR case.
    func benchNVDIMM() throws {
        let latency = flushLatencyNs
        print("7. Virtualized NVDIMM WPQ flushing (simulated platform; flush hint drain time \(latency) ns, --flush-latency-ns)")
        let rawSamples = quick ? 2000 : 20_000
        let (rawEmpty, rawQueued) = try rawPhysicalFlush(latency: latency, samples: rawSamples, queued: 16)
        print("   Raw physical flush (PersistentPlatform.physicalFlush, one controller, median of \(rawSamples)):")
        print("   empty WPQ \(nanos(rawEmpty)), 16 lines queued \(nanos(rawQueued))")
        let records = quick ? 10 : 40
        let target = quick ? 200 : 4000
        var t = Table(["vCPUs", "coalescing", "guest flushes", "physical per guest flush", "latency median", "p99",
                       "median / raw flush"])
        for n in [1, 2, 4, 8, 16] {
            for coalesce in [false, true] {
                var lat: [UInt64] = []
                var f = FlushStatistics()
                let reps = max(quick ? 2 : 3, (target + n * records - 1) / (n * records))
                for _ in 0..<reps {
                    let (l, s) = try guestFlushRun(cpus: n, records: records, coalesce: coalesce, latency: latency, needsFlush: true)
                    lat += l
                    f.guestFlushes += s.guestFlushes; f.physicalFlushes += s.physicalFlushes; f.exits += s.exits
                }
                let m = Bench.percentile(lat, 0.5)
                t.add(["\(n)", coalesce ? "on" : "off", "\(f.guestFlushes)", fmt(Double(f.physicalFlushes) / Double(max(1, f.guestFlushes))),
                       nanos(m), nanos(Bench.percentile(lat, 0.99)), fmt(Double(m) / Double(max(1, rawEmpty)))])
            }
        }
        print(t.render())
        let adrCPUs = 4
        let (_, adr, eptExits) = try adrRun(cpus: adrCPUs, records: records)
        print("   ADR platform (no WPQ flushing needed), \(adrCPUs) vCPUs: \(adr.untrappedWrites) guest flushes (vFHA writes), \(adr.exits) flush exits,")
        print("   \(eptExits) EPT-violation exits, \(adr.physicalFlushes) physical flushes: \(fmt(Double(adr.exits + eptExits) / Double(max(1, adr.untrappedWrites)))) exits per guest flush.")
        print("   Latency = exit to resume (VirtualMachine.flushLatencies). Each guest flush drains both controllers of")
        print("   host region 1, one after the other: 2 physical flushes without coalescing. Ratio: to the raw flush with an")
        print("   empty WPQ. vCPU threads on \(hostCPUs()) host CPUs: at most that many vCPUs run at once. Coalescing saves a")
        print("   physical flush only when two or more vCPUs wait behind a flush in progress (a flush that started before")
        print("   a guest's write cannot satisfy it), and its waiters sleep: with more vCPU threads than host CPUs the p99")
        print("   includes threads descheduled while they wait or flush.\n")
    }

    /// Median cost of one physical flush of controller 0x000, with an empty WPQ and with `queued`
    /// lines in it (queued by a guest: stores, CLWBs and an SFENCE to lines of that controller).
    func rawPhysicalFlush(latency: UInt64, samples: Int, queued: Int) throws -> (UInt64, UInt64) {
        let desc = PlatformDescription.standard(needsWPQFlush: true, flushLatencyNanos: latency)
        let controller = desc.controllers[0]
        // Empty WPQ.
        let bare = try PersistentPlatform(desc)
        var empty: [UInt64] = []
        empty.reserveCapacity(samples)
        for _ in 0..<samples {
            let t0 = Monitor.now()
            try bare.physicalFlush(controller: controller.id, address: controller.flushHints[0])
            empty.append(Monitor.now() - t0)
        }
        // With `queued` lines: a guest fills the WPQ, exits on an OUT, the host flushes, and so on.
        let backend = try SimulatorBackend(platform: desc)
        let vm = try simVM(backend)
        defer { try? vm.destroy() }
        let base = NVDIMMSim.nvdimmGPA
        try vm.addNVDIMM(gpa: GPA(base), size: NVDIMMSim.nvdimmSize, hostRegion: 1, regionOffset: 0)
        let code: UInt64 = 0x1000
        var a = Assembler(origin: code)
        a.load64(1, 0xC0FFEE)
        a.load64(2, base)               // lines 0..<queued of region 1: the first 4 KiB, controller 0x000
        let loop = a.here
        for i in 0..<queued {
            a.emit(.store, 2, 1, Int32(i * 64))
            a.emit(.clwb, 2, 0, Int32(i * 64))
        }
        a.emit(.sfence)
        a.out(1, port: 0x60)
        a.jmp(to: loop)
        // Paging off: Xu governs (every address is user-mode).
        try vm.setPolicy(PolicyRange(start: GPA(code), size: 0x1000, pageSize: .size4K, permissions: [.read, .userExecute]))
        try vm.writeMemory(GPA(code), bytes: a.bytes)
        let v = try vm.makeVCPU(index: 0)
        var r = try v.registers()
        r.rip = code
        try v.setRegisters(r)
        let platform = backend.platform
        var full: [UInt64] = []
        full.reserveCapacity(samples)
        for _ in 0..<samples {
            var x = try v.run()
            while x.reason == .budget { x = try v.run() }
            guard x.reason == .io else { throw NPTError(.state, "benchmark guest ended with \(x)") }
            guard platform.queuedLines == queued else { throw NPTError(.state, "\(platform.queuedLines) lines queued, expected \(queued)") }
            let t0 = Monitor.now()
            try platform.physicalFlush(controller: controller.id, address: controller.flushHints[0])
            full.append(Monitor.now() - t0)
        }
        return (Bench.percentile(empty, 0.5), Bench.percentile(full, 0.5))
    }

    /// One VM: `cpus` vCPU threads each make `records` records durable at once; the flush latencies and statistics.
    func guestFlushRun(cpus n: Int, records: Int, coalesce: Bool, latency: UInt64, needsFlush: Bool) throws -> ([UInt64], FlushStatistics) {
        let backend = try SimulatorBackend(platform: .standard(needsWPQFlush: needsFlush, flushLatencyNanos: latency))
        let vm = try simVM(backend)
        defer { try? vm.destroy() }
        let cpus = try NVDIMMScenario(needsWPQFlush: needsFlush, options: FlushOptions(trap: .auto, coalesce: coalesce), cpus: n,
                                      records: records, tail: false).setUp(vm)
        vm.recordFlushLatencies(true)
        let failures = Atomic<Int>(0)
        // Every thread waits at a gate, so that the vCPUs start (and flush) at once.
        let go = Atomic<Bool>(false)
        let threads = cpus.map { v in HostThread {
            while !go.load(ordering: .acquiring) { sleepNanos(20_000) }
            do { _ = try NVDIMMScenario.runToHalt(v) } catch { failures.wrappingAdd(1, ordering: .relaxed) }
        } }
        sleepNanos(1_000_000)
        go.store(true, ordering: .releasing)
        for t in threads { t.join() }
        vm.recordFlushLatencies(false)
        if failures.load(ordering: .relaxed) > 0 { throw NPTError(.state, "a vCPU thread failed") }
        let f = vm.flushStatistics()
        guard f.guestFlushes == UInt64(n * records) else { throw NPTError(.state, "\(f.guestFlushes) guest flushes, expected \(n * records)") }
        return (vm.flushLatencies(), f)
    }

    /// The same guests on the ADR platform: flush statistics and EPT-violation exits.
    func adrRun(cpus n: Int, records: Int) throws -> ([UInt64], FlushStatistics, UInt64) {
        let backend = try SimulatorBackend(platform: .standard(needsWPQFlush: false, flushLatencyNanos: flushLatencyNs))
        let vm = try simVM(backend)
        defer { try? vm.destroy() }
        let cpus = try NVDIMMScenario(needsWPQFlush: false, cpus: n, records: records, tail: false).setUp(vm)
        let threads = cpus.map { v in HostThread { _ = try? NVDIMMScenario.runToHalt(v) } }
        for t in threads { t.join() }
        let f = vm.flushStatistics()
        guard f.untrappedWrites == UInt64(n * records) else { throw NPTError(.state, "\(f.untrappedWrites) vFHA writes, expected \(n * records)") }
        return (vm.flushLatencies(), f, vm.statistics().exitsEPTViolation)
    }
}

func nanos(_ ns: UInt64) -> String { ns >= 10_000 ? micros(ns) : "\(ns) ns" }

final class BarrierState: @unchecked Sendable {
    var arrived = 0
    var epoch = 0
    var stopping = false
    var requester = -1
    var raisedAt: UInt64 = 0
    var latencies: [UInt64] = []
}

#if DEBUG
let isDebugBuild = true
#else
let isDebugBuild = false
#endif


func median(_ xs: [Duration]) -> Duration {
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}

func show(_ d: Duration) -> String {
    let s = seconds(d)
    if s >= 1 { return fmt(s, 2) + " s" }
    if s >= 1e-3 { return fmt(s * 1e3, 2) + " ms" }
    if s >= 1e-6 { return fmt(s * 1e6, 2) + " us" }
    return fmt(s * 1e9, 1) + " ns"
}
