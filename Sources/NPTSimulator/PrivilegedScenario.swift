import NPTCore
import Synchronization

/// The privileged-mode (SMM-like) scenario: `cpus` vCPUs on real threads run a guest loop that
/// bumps its own heartbeat in RAM and, every 64 iterations, tries to read the special region (which
/// must fail: the region is not in the view outside the mode). Another thread raises `requests`
/// enter-mode interrupts on random vCPUs. The region's handler sums every heartbeat, spins, sums
/// again: a difference means a CPU outside the mode ran while the region was visible (it prints on
/// port 8); then it counts its entry in region memory, prints the count (port 9) and executes RSM.
public struct PrivilegedScenario: Sendable {
    public static let ram: UInt64 = 4 << 20
    public static let code: UInt64 = 0x1000
    public static let heartbeats: UInt64 = 0x10000
    public static let regionBase: UInt64 = 0x8000_0000
    public static let regionSize: UInt64 = 0x10000
    public static let regionData: UInt64 = regionBase + 0x1000
    public static let magic: UInt64 = 0x5EC_0DE
    public static let portLeak: Int32 = 7
    public static let portMoved: Int32 = 8
    public static let portCount: Int32 = 9

    public var cpus: Int
    public var requests: Int
    public var seed: UInt64
    /// Pause between two requests (0: as fast as possible).
    public var pauseNanos: UInt64
    public var stopTimeoutNanos: UInt64
    public init(cpus: Int, requests: Int, seed: UInt64 = 1, pauseNanos: UInt64 = 0, stopTimeoutNanos: UInt64 = 10_000_000_000) {
        self.cpus = cpus; self.requests = requests; self.seed = seed
        self.pauseNanos = pauseNanos; self.stopTimeoutNanos = stopTimeoutNanos
    }

    public struct Outcome: Sendable {
        public var leaks = 0
        public var movedWhileVisible = 0
        public var handlerCounts: [UInt64] = []
        public var probesBlocked = 0
        public var failures = 0
        public var stats = PrivilegedStatistics()
        public var records: [PrivilegedEntryRecord] = []
        public var outsideWhileVisible: UInt64 = 0
        public var finalState = PMState(cpus: 0)
        public var wallNanos: UInt64 = 0
    }

    func guestCode() -> [UInt8] {
        var a = Assembler(origin: PrivilegedScenario.code)
        let start = a.here
        a.emit(.addi, 3, 0, 1)
        a.emit(.store, 1, 3, 0)
        a.emit(.addi, 6, 0, -1)
        a.jnz(6, to: start)
        a.emit(.movi, 6, 0, 64)
        a.emit(.load, 4, 10, 0)        // probe the region
        a.emit(.sub, 4, 5)
        a.jnz(4, to: start)
        a.out(4, port: PrivilegedScenario.portLeak)
        a.jmp(to: start)
        return a.bytes
    }

    func handlerCode() -> [UInt8] {
        var a = Assembler(origin: PrivilegedScenario.regionBase)
        func sum(into r: UInt8) {
            a.emit(.movi, 6, 0, Int32(PrivilegedScenario.heartbeats))
            a.emit(.movi, 7, 0, Int32(cpus))
            a.emit(.movi, r, 0, 0)
            let loop = a.here
            a.emit(.load, 8, 6, 0)
            a.emit(.add, r, 8)
            a.emit(.addi, 6, 0, 8)
            a.emit(.addi, 7, 0, -1)
            a.jnz(7, to: loop)
        }
        sum(into: 9)
        a.emit(.movi, 7, 0, 300)
        let spin = a.here
        a.emit(.addi, 7, 0, -1)
        a.jnz(7, to: spin)
        sum(into: 11)
        a.emit(.sub, 11, 9)
        let skip = a.here + 16
        a.jz(11, to: skip)
        a.out(11, port: PrivilegedScenario.portMoved)
        a.load64(6, PrivilegedScenario.regionData)
        a.emit(.load, 8, 6, 8)
        a.emit(.addi, 8, 0, 1)
        a.emit(.store, 6, 8, 8)
        a.out(8, port: PrivilegedScenario.portCount)
        a.emit(.rsm)
        var region = a.bytes
        region += [UInt8](repeating: 0, count: Int(PrivilegedScenario.regionData - PrivilegedScenario.regionBase) - region.count)
        withUnsafeBytes(of: PrivilegedScenario.magic.littleEndian) { region += $0 }
        return region
    }

    /// Builds the VM's guest and region; returns the vCPUs with their registers set.
    public func prepare(_ vm: VirtualMachine) throws -> [VirtualCPU] {
        // Paging is off: every address is user-mode (SDM), so Xu governs the loop's fetches.
        try vm.setPolicy(PolicyRange(start: GPA(PrivilegedScenario.code), size: 0x1000, pageSize: .size4K,
                                     permissions: [.read, .userExecute]))
        try vm.writeMemory(GPA(PrivilegedScenario.code), bytes: guestCode())
        try vm.defineRegion(start: GPA(PrivilegedScenario.regionBase), size: PrivilegedScenario.regionSize,
                            contents: handlerCode(), entryOffset: 0)
        vm.privileged.stopTimeoutNanos = stopTimeoutNanos
        var out: [VirtualCPU] = []
        for i in 0..<cpus {
            let cpu = try vm.makeVCPU(index: UInt32(i))
            var r = Registers()
            r.rip = PrivilegedScenario.code
            r.gpr[1] = PrivilegedScenario.heartbeats + UInt64(i) * 8
            r.gpr[5] = PrivilegedScenario.magic
            r.gpr[6] = 64
            r.gpr[10] = PrivilegedScenario.regionData
            try cpu.setRegisters(r)
            out.append(cpu)
        }
        return out
    }

    /// Runs the scenario on `vm` (a backend with `.privilegedMode`; give it a step budget so the
    /// vCPU threads see the end).
    public func run(on vm: VirtualMachine) throws -> Outcome {
        let cpus = try prepare(vm)
        let done = Atomic<Bool>(false)
        let results = NPTMutex(Outcome())
        let failure = NPTMutex<NPTError?>(nil)
        let t0 = Monitor.now()
        var threads: [HostThread] = []
        for cpu in cpus {
            threads.append(HostThread {
                var local = Outcome()
                do throws(NPTError) {
                    while !done.load(ordering: .acquiring) {
                        let x = try cpu.run()
                        switch x.reason {
                        case .budget: continue
                        case .io:
                            switch Int32(x.ioPort) {
                            case PrivilegedScenario.portLeak: local.leaks += 1
                            case PrivilegedScenario.portMoved: local.movedWhileVisible += 1
                            case PrivilegedScenario.portCount: local.handlerCounts.append(x.ioValue)
                            default: break
                            }
                        case .mbecViolation:
                            // The probe could not read the region: skip the load.
                            local.probesBlocked += 1
                            var r = try cpu.registers()
                            r.rip += 8
                            try cpu.setRegisters(r)
                        case .privilegedEntryFailed:
                            local.failures += 1
                        default:
                            throw NPTError(.state, "vCPU \(cpu.index): unexpected exit \(x)")
                        }
                    }
                } catch {
                    failure.withLock { $0 = $0 ?? error }
                    done.store(true, ordering: .releasing)
                }
                results.withLock { r in
                    r.leaks += local.leaks; r.movedWhileVisible += local.movedWhileVisible
                    r.handlerCounts += local.handlerCounts; r.probesBlocked += local.probesBlocked
                    r.failures += local.failures
                }
            })
        }
        // The interrupt source.
        var rng = seed | 1
        for _ in 0..<requests {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
            try cpus[Int(rng % UInt64(cpus.count))].raisePrivileged()
            if pauseNanos > 0 { sleepNanos(pauseNanos) }
            if done.load(ordering: .acquiring) { break }
        }
        // Wait until every request was served or failed.
        while !done.load(ordering: .acquiring) {
            let s = vm.privileged.statistics
            if s.entries + s.failures >= UInt64(requests) && vm.privileged.holder == nil { break }
            sleepNanos(1_000_000)
        }
        done.store(true, ordering: .releasing)
        for t in threads { t.join() }
        if let e = failure.withLock({ $0 }) { throw e }
        var out = results.withLock { $0 }
        out.wallNanos = Monitor.now() - t0
        out.stats = vm.privileged.statistics
        out.records = vm.privileged.entryRecords
        out.outsideWhileVisible = vm.backendVM.outsideWhileVisible
        out.finalState = vm.privileged.protocolState
        return out
    }
}
