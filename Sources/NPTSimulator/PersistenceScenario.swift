import NPTCore
import Synchronization

/// The persistent-memory scenario: each vCPU appends `records` 8-byte records to its own log in an
/// NVDIMM range, making each durable by the documented protocol (store, CLWB, SFENCE, a write to
/// the vFHA) and then announcing it on port `portDurable` (value = the record number). With `tail`
/// it then writes two more records that it does not make durable: one only stored (port
/// `portStoredOnly`), one stored, written back and fenced but with no vFHA write
/// (`portFencedOnly`). Paging is off: linear = guest-physical.
public struct PersistenceScenario: Sendable {
    public static let ram: UInt64 = 4 << 20
    public static let nvdimmGPA: UInt64 = 0x1_0000_0000
    public static let nvdimmSize: UInt64 = 2 << 20
    public static let portDurable: Int32 = 0x50
    public static let portStoredOnly: Int32 = 0x51
    public static let portFencedOnly: Int32 = 0x52

    public var cpus: Int
    public var records: Int
    public var tail: Bool
    /// Host region backing the NVDIMM range (region 1 of the standard platform is interleaved
    /// across two controllers).
    public var hostRegion: UInt32
    public init(cpus: Int = 1, records: Int = 4, tail: Bool = true, hostRegion: UInt32 = 1) {
        self.cpus = cpus; self.records = records; self.tail = tail; self.hostRegion = hostRegion
    }

    /// Record `k` of vCPU `cpu`: its own 64-byte line, so that CLWB of one record moves no other.
    public static func recordGPA(cpu: Int, _ k: Int) -> UInt64 { nvdimmGPA + UInt64(cpu) * 0x4000 + UInt64(k) * 64 }
    public static func recordValue(cpu: Int, _ k: Int) -> UInt64 { 0xD00D_0000_0000 | UInt64(cpu) << 16 | UInt64(k + 1) }
    static func code(cpu: Int) -> UInt64 { 0x1000 + UInt64(cpu) * 0x1000 }

    /// The guest code of vCPU `cpu` (r1 = value, r2 = record address, r3 = vFHA).
    public func program(cpu: Int, vfha: UInt64) -> [UInt8] {
        var a = Assembler(origin: PersistenceScenario.code(cpu: cpu))
        a.load64(3, vfha)
        func record(_ k: Int) {
            a.load64(1, PersistenceScenario.recordValue(cpu: cpu, k))
            a.load64(2, PersistenceScenario.recordGPA(cpu: cpu, k))
            a.emit(.store, 2, 1, 0)
        }
        for k in 0..<records {
            record(k)
            a.emit(.clwb, 2, 0, 0)
            a.emit(.sfence)
            a.emit(.store, 3, 1, 0)       // the flush: any value to the vFHA
            a.emit(.movi, 4, 0, Int32(k))
            a.out(4, port: PersistenceScenario.portDurable)
        }
        if tail {
            record(records)
            a.emit(.movi, 4, 0, Int32(records))
            a.out(4, port: PersistenceScenario.portStoredOnly)
            record(records + 1)
            a.emit(.clwb, 2, 0, 0)
            a.emit(.sfence)
            a.emit(.movi, 4, 0, Int32(records + 1))
            a.out(4, port: PersistenceScenario.portFencedOnly)
        }
        a.emit(.hlt)
        return a.bytes
    }

    /// Adds the NVDIMM range, loads every vCPU's code and creates the vCPUs.
    public func setUp(_ vm: VirtualMachine) throws(NPTError) -> [VirtualCPU] {
        if vm.nvdimmRanges.isEmpty {
            try vm.addNVDIMM(gpa: GPA(PersistenceScenario.nvdimmGPA), size: PersistenceScenario.nvdimmSize,
                             hostRegion: hostRegion, regionOffset: 0)
        }
        guard let vfha = vm.virtualFlushHint else { throw NPTError(.state, "no vFHA") }
        // The code pages. Paging is off, and with paging off every linear address is a user-mode
        // address (SDM), so under MBEC the user-execute bit governs these fetches.
        try vm.setPolicy(PolicyRange(start: GPA(PersistenceScenario.code(cpu: 0)), size: UInt64(cpus) * 0x1000,
                                     pageSize: .size4K, permissions: [.read, .userExecute]))
        var out: [VirtualCPU] = []
        for c in 0..<cpus {
            try vm.writeMemory(GPA(PersistenceScenario.code(cpu: c)), bytes: program(cpu: c, vfha: vfha.raw))
            let v = try vm.makeVCPU(index: UInt32(c))
            var r = try v.registers()
            r.rip = PersistenceScenario.code(cpu: c)
            try v.setRegisters(r)
            out.append(v)
        }
        return out
    }

    /// Runs `v` until HLT (through budget exits); returns the (port, value) pairs it printed.
    @discardableResult
    public static func runToHalt(_ v: VirtualCPU) throws(NPTError) -> [(Int32, UInt64)] {
        var out: [(Int32, UInt64)] = []
        while true {
            let x = try v.run()
            switch x.reason {
            case .io: out.append((Int32(x.ioPort), x.ioValue))
            case .halt: return out
            case .budget: continue
            default: throw NPTError(.state, "unexpected exit \(x)")
            }
        }
    }

    public static func makeVM(backend: SimulatorBackend, budget: UInt64 = 0) throws(NPTError) -> VirtualMachine {
        let reg = BackendRegistry()
        try reg.register(backend, makeDefault: true)
        return try VirtualMachine(config: VMConfig(ramSize: ram, maxStepsPerRun: budget), registry: reg)
    }
}

/// Checks crash consistency: it follows every persistence event of a run, keeps, by the documented
/// protocol, which stores are durable (a store by CPU c becomes durable when c, after it, wrote its
/// line back, fenced, and then completed a write to the vFHA), and after every event (each one a
/// possible crash point: nothing else changes persistent state) computes what a power failure would
/// leave on the media and compares.
public final class CrashChecker: @unchecked Sendable {
    public struct Loss: Sendable, Equatable, CustomStringConvertible {
        public var crashPoint: Int
        public var spa: UInt64
        public var expected: UInt64
        public var found: UInt64
        public var description: String { "crash point \(crashPoint): spa \(hex(spa)) holds \(hex(found)), durable value \(hex(expected))" }
    }
    public struct Report: Sendable {
        public var crashPoints = 0
        /// (crash point, durable store) pairs checked.
        public var checks = 0
        public var durableStores = 0
        public var losses: [Loss] = []
    }

    private struct CPU { var stored: [(UInt64, UInt64)] = []; var writtenBack: [(UInt64, UInt64)] = []; var fenced: [(UInt64, UInt64)] = [] }
    private struct State {
        var cpus: [ObjectIdentifier: CPU] = [:]
        var durable: [UInt64: UInt64] = [:]
        var later: [UInt64: Set<UInt64>] = [:]
        var report = Report()
    }
    private let state = NPTMutex(State())
    private let platform: PersistentPlatform

    public init(platform: PersistentPlatform) {
        self.platform = platform
        platform.observe { [weak self] cpu, e in self?.event(cpu, e) }
        check()
    }

    public func stop() -> Report {
        platform.observe(nil)
        return state.withLock { $0.report }
    }

    private func event(_ cpu: ObjectIdentifier?, _ e: PersistenceEvent) {
        state.withLock { s in
            guard let cpu else { return }
            var c = s.cpus[cpu] ?? CPU()
            switch e {
            case .store(let spa, let v):
                c.stored.append((spa, v))
                if s.durable[spa] != nil { s.later[spa, default: []].insert(v) }
            case .writeBack(let spa):
                let l = spa & ~63
                c.writtenBack += c.stored.filter { $0.0 & ~63 == l }
                c.stored.removeAll { $0.0 & ~63 == l }
            case .fence:
                c.fenced += c.writtenBack
                c.writtenBack.removeAll()
            case .flushHintWrite:
                for (spa, v) in c.fenced {
                    if s.durable[spa] == nil { s.report.durableStores += 1 }
                    s.durable[spa] = v
                    s.later[spa] = []
                }
                c.fenced.removeAll()
            case .physicalFlush:
                break
            }
            s.cpus[cpu] = c
        }
        check()
    }

    /// One crash point: what would survive a power failure now. The media is read under the
    /// checker's lock, so a store another CPU marks durable is never checked against a snapshot
    /// taken before that CPU's flush (lock order: checker, then platform; events are emitted
    /// outside the platform's lock).
    private func check() {
        state.withLock { s in
            let media = platform.survivingMedia()
            let point = s.report.crashPoints
            s.report.crashPoints += 1
            for (spa, v) in s.durable {
                s.report.checks += 1
                let found = PersistentPlatform.read64(media, spa)
                if found != v && !(s.later[spa]?.contains(found) ?? false) {
                    s.report.losses.append(Loss(crashPoint: point, spa: spa, expected: v, found: found))
                }
            }
        }
    }
}
