import NPTCore
import NPTHost
import NPTKit
import NPTScenarios
import NPTSimulator
import NPTTrace
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The replay backend (libnptkit-replay.so, beside the test binary) in the backend-swap family: a
/// run recorded by the core's recording layer on sim replays with the same outcome; a flipped
/// decision is reported at its event; bad traces are refused at load with their byte offset.
enum Replay {
    static let plugin: String = {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        let exe = String(decoding: buf[0..<max(0, n)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return String(exe[..<(exe.lastIndex(of: "/") ?? exe.startIndex)]) + "/libnptkit-replay.so"
    }()
    static func temp(_ name: String) -> String { "/tmp/nptkit-replay-test-\(getpid())-\(name)" }

    /// A registry with the replay backend of `trace` (its own session).
    static func host(_ trace: String, session: String) throws -> ScenarioHost {
        let r = BackendRegistry()
        try r.register(SimulatorBackend(), makeDefault: true)
        _ = try NPTKitRuntime.loadPlugin(plugin, arguments: [PluginArgument(key: "trace", value: trace),
                                                             PluginArgument(key: "session", value: session),
                                                             PluginArgument(key: "wait-ms", value: "200")], into: r)
        return try SwapBackends.host(r, "replay")
    }

    /// HVCI (5 system calls) on sim in `mode`, recorded to `path`.
    static func recordHVCI(_ path: String, mode: VMConfig.MBECMode, compact: Bool = true) throws -> (HVCIScenario.Outcome, VMStatistics) {
        let recorder = try TraceRecorder(path: path, compactExitPaths: compact)
        let r = BackendRegistry()
        try r.register(SimulatorBackend(), makeDefault: true)
        let host = try ScenarioHost(registry: r, backendName: "sim", makeVM: { c, reg throws(NPTError) in
            var c = c
            c.recorder = recorder
            return try VirtualMachine(config: c, registry: reg)
        })
        let result = try HVCIScenario(syscalls: 5).run(host: host, mode: mode)
        try recorder.finish()
        return result
    }

    /// Runs `path` with `args`, its stderr to the file `stderr`: the exit status.
    static func spawn(_ path: String, _ args: [String], stderr: String) throws -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 2, stderr, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        var argv: [UnsafeMutablePointer<CChar>?] = ([path] + args).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, path, &actions, nil, &argv, environ) == 0 else { throw NPTError(.backend, "cannot run \(path)") }
        var status: Int32 = 0
        guard waitpid(pid, &status, 0) == pid else { throw NPTError(.backend, "waitpid failed") }
        return (status & 0x7f) == 0 ? (status >> 8) & 0xff : -1
    }

    /// A copy of `path` in which `change` rewrites records (nil: kept); the event number of the
    /// first record it changed (.max: none).
    /// A copy of `path` with the records `change` returns in place of the originals; the first
    /// changed event's number. `compact`: every run of exit, hierarchy, exit controls, decision of
    /// one vCPU at one timestamp (each part but the exit and the decision optional, in that order)
    /// written as one exit-path record, else every record on its own (grouped here independently
    /// of the recorder's own logic).
    static func rewrite(_ path: String, to out: String, compact: Bool = false, _ change: (TraceRecord) -> TraceRecord?) throws -> UInt64 {
        let r = try TraceReader(path: path)
        let w = try TraceWriter(sink: try FileTraceSink(path: out), flags: compact ? TraceFormat.compactExitPaths : 0)
        var first: UInt64 = .max
        var group: [TraceRecord] = [], at: UInt64 = 0
        func flush() throws { for g in group { try w.append(g, at: at) }; group = [] }
        while let e = try r.next() {
            if case .end = e.record { break }
            var rec = e.record
            if let c = change(rec) { rec = c; first = min(first, e.index) }
            guard compact else { try w.append(rec, at: e.timestamp); continue }
            let vcpu: UInt32? = if case .exit(let v, _) = group.first { v } else { nil }
            switch rec {
            case .exit: try flush(); group = [rec]; at = e.timestamp; continue
            case .hierarchy(let v, _) where v == vcpu && e.timestamp == at && group.count == 1:
                group.append(rec); continue
            case .exitControls(let v, _) where v == vcpu && e.timestamp == at && !group.contains(where: { if case .exitControls = $0 { true } else { false } }):
                group.append(rec); continue
            case .decision(let v, let action, let decided) where v == vcpu && e.timestamp == at:
                guard case .exit(_, let x) = group[0] else { break }
                var h: UInt32?, c: UInt32?
                for g in group.dropFirst() {
                    if case .hierarchy(_, let value) = g { h = value }
                    if case .exitControls(_, let value) = g { c = value }
                }
                try w.appendExitPath(vcpu: v, exit: x, hierarchy: h, exitControls: c, action: action.rawValue,
                                     decision: decided == x ? nil : decided, at: at)
                group = []
                continue
            default: break
            }
            try flush()
            try w.append(rec, at: e.timestamp)
        }
        try flush()
        try w.finish()
        return first
    }

    /// A copy of `path` with the `which`-th hierarchy decision flipped; its event number.
    static func flipHierarchy(_ path: String, to out: String, which: Int, compact: Bool = false) throws -> UInt64 {
        var seen = 0
        return try rewrite(path, to: out, compact: compact) { rec in
            guard case .hierarchy(let v, let h) = rec else { return nil }
            defer { seen += 1 }
            return seen == which ? .hierarchy(vcpu: v, hierarchy: 1 - h) : nil
        }
    }

    /// The demo's privileged section (3 vCPUs, 2 requests, 2 bursts, seed 11, 3 ms apart), with
    /// `requests` requests.
    static func privileged(requests: Int = 2) -> PrivilegedScenario {
        PrivilegedScenario(cpus: 3, requests: requests, bursts: 2, seed: 11, pauseNanos: 3_000_000)
    }

    /// `host`'s VMs recorded to `path` (a replay host recorded again, too).
    static func recording(_ registry: BackendRegistry, _ name: String, to path: String) throws -> (ScenarioHost, TraceRecorder) {
        let recorder = try TraceRecorder(path: path)
        // A C-table backend's VMs need a VM handle (NPTKitRuntime.makeVM).
        let host = try ScenarioHost(registry: registry, backendName: name, makeVM: { c, reg throws(NPTError) in
            var c = c
            c.recorder = recorder
            return try name == "sim" ? VirtualMachine(config: c, registry: reg) : NPTKitRuntime.makeVM(config: c, registry: reg)
        }, destroyVM: { vm throws(NPTError) in try name == "sim" ? vm.destroy() : NPTKitRuntime.destroyVM(vm) })
        return (host, recorder)
    }

    /// The privileged section on sim, recorded to `path`.
    static func recordPrivileged(_ path: String) throws -> PrivilegedScenario.Outcome {
        let r = BackendRegistry()
        try r.register(SimulatorBackend(), makeDefault: true)
        let (host, recorder) = try recording(r, "sim", to: path)
        let o = try privileged().run(host: host, mode: .exact)
        try recorder.finish()
        return o
    }

    /// Every record of `path`.
    static func records(_ path: String) throws -> [TraceRecord] {
        let r = try TraceReader(path: path)
        var out: [TraceRecord] = []
        while let e = try r.next() { out.append(e.record) }
        return out
    }

    /// The replay of HVCI (5 system calls, exact mode) against `trace`, which must fail: its message
    /// (nil, and an issue recorded, if it did not fail).
    static func divergence(_ trace: String) throws -> String? {
        let host = try Replay.host(trace, session: trace)
        do {
            _ = try HVCIScenario(syscalls: 5).run(host: host, mode: .exact)
        } catch let e as NPTError {
            return e.message
        }
        Issue.record("the replay of '\(trace)' did not fail")
        return nil
    }
}

@Suite(.serialized) struct ReplayTests {
    struct Summary: Equatable {
        var printed: [UInt64], violations: [String], faults: [String], attacks: Int, halted: Bool
        var exits: UInt64, switches: UInt64, reported: UInt64, instructions: UInt64
        init(_ r: (HVCIScenario.Outcome, VMStatistics)) {
            printed = r.0.printed; violations = r.0.violations.map { "\($0)" }; faults = r.0.faultsSeenByGuest.map { "\($0.vector) \($0.rip)" }
            attacks = r.0.attacksSucceeded; halted = r.0.halted
            exits = r.1.exitsTotal; switches = r.1.hierarchySwitches; reported = r.1.violationsReported; instructions = r.1.instructions
        }
    }

    /// The backend-swap test's replay half: HVCI recorded on sim in every mode replays with the
    /// same outcome and statistics (the simulator's own counters, instructions, come from the trace).
    @Test(arguments: VMConfig.MBECMode.allCases)
    func aRunRecordedOnSimReplaysWithTheSameOutcome(mode: VMConfig.MBECMode) throws {
        let path = Replay.temp("sim-\(mode)")
        defer { unlink(path) }
        let recorded = try Replay.recordHVCI(path, mode: mode)
        let host = try Replay.host(path, session: path)
        #expect(host.guestISA == .simulator)
        #expect(!host.capabilities.contains(.privilegedMode))
        let replayed = try HVCIScenario(syscalls: 5).run(host: host, mode: mode)
        #expect(Summary(replayed) == Summary(recorded))
        #expect(Summary(recorded).violations.count == 2)
    }

    /// A flipped hierarchy decision (a mutated copy): the replay fails at that event, naming both
    /// decisions and the events before it, and every later call fails too.
    /// `compact`: the flipped hierarchy inside an exit-path record (trace 1.3), else a record of its own.
    @Test(arguments: [0, 3], [false, true])
    func aFlippedDecisionIsReportedAtItsEvent(which: Int, compact: Bool) throws {
        let path = Replay.temp("flip-src-\(which)-\(compact)"), flipped = Replay.temp("flip-\(which)-\(compact)")
        defer { unlink(path); unlink(flipped) }
        _ = try Replay.recordHVCI(path, mode: .exact)
        let event = try Replay.flipHierarchy(path, to: flipped, which: which, compact: compact)
        try #require(event != .max)
        let reader = try TraceReader(path: flipped)
        while try reader.next() != nil {}
        #expect((reader.exitPathRecords > 0) == compact)
        let m = try #require(try Replay.divergence(flipped))
        #expect(m.contains("diverged at event \(event) "), "\(m)")
        #expect(m.contains("recorded: hierarchy vcpu 0"), "\(m)")
        #expect(m.contains("replayed: hierarchy vcpu 0"), "\(m)")
        #expect(m.contains("differs in: hierarchy "), "\(m)")
        #expect(m.contains("before it:"), "\(m)")
    }

    /// Bad traces are refused when the plugin loads (it reads the whole trace first), with the
    /// reader's error and byte offset in the message: nothing is replayed.
    @Test func badTracesAreRefusedAtLoadWithTheirOffset() throws {
        let path = Replay.temp("bad-src")
        defer { unlink(path) }
        _ = try Replay.recordHVCI(path, mode: .lazy)
        let good = try readAll(path)
        var cases: [(String, [UInt8], String)] = [
            ("truncated", Array(good.prefix(good.count - 7)), "truncated at byte offset"),
            ("version", { var b = good; b[8] = 9; return b }(), "unsupported version at byte offset 8"),
            ("magic", { var b = good; b[0] = 0x41; return b }(), "not an NPTKit trace at byte offset 0"),
        ]
        var corrupt = good
        corrupt[40] ^= 0x5A
        cases.append(("corrupt", corrupt, "corrupt at byte offset 20"))
        cases.append(("empty", [], "truncated at byte offset 0"))
        for (name, bytes, expected) in cases {
            let p = Replay.temp("bad-\(name)")
            defer { unlink(p) }
            try writeAll(p, bytes)
            do {
                _ = try Replay.host(p, session: p)
                Issue.record("\(name): a bad trace was accepted")
            } catch let e as NPTError {
                #expect(e.code == .invalidArgument, "\(name): \(e)")
                #expect(e.message.contains(expected), "\(name): \(e.message)")
            }
        }
        // A trace without the recording layer's backend record (the golden 1.0 trace) is refused too.
        do {
            _ = try Replay.host(fixture("golden-1.0.trace"), session: "golden")
            Issue.record("a trace without a backend record was accepted")
        } catch let e as NPTError {
            #expect(e.message.contains("no backend record"), "\(e.message)")
        }
    }

    /// A divergence names the field that differs: a register write whose recorded rbx was changed
    /// is reported with "differs in: rbx RECORDED -> REPLAYED", and nothing else of it.
    @Test func aDivergenceNamesTheDifferingRegister() throws {
        let path = Replay.temp("regs-src"), changed = Replay.temp("regs-changed")
        defer { unlink(path); unlink(changed) }
        _ = try Replay.recordHVCI(path, mode: .exact)
        var original: UInt64?
        let event = try Replay.rewrite(path, to: changed) { rec in
            guard original == nil, case .regsWritten(let v, var regs) = rec else { return nil }
            original = regs.gpr[3]
            regs.gpr[3] ^= 0x5A
            return .regsWritten(vcpu: v, regs)
        }
        let rbx = try #require(original)
        let m = try #require(try Replay.divergence(changed))
        #expect(m.contains("diverged at event \(event) "), "\(m)")
        #expect(m.contains("differs in: rbx 0x\(String(rbx ^ 0x5A, radix: 16)) -> 0x\(String(rbx, radix: 16))\n"), "\(m)")
        // The same for an exit the core rewrote (a decision) and for a record of another kind.
        let x = TraceExit(reason: .io, ioPort: 1, ioValue: 7, rip: 0x1000)
        var y = x
        y.rip = 0x1008
        #expect(TraceRecord.decision(vcpu: 0, action: .tool, exit: x).differingFields(.decision(vcpu: 0, action: .tool, exit: y)) == ["exit.rip 0x1000 -> 0x1008"])
        #expect(TraceRecord.hierarchy(vcpu: 0, hierarchy: 1).differingFields(.fence(vcpu: 0)) == ["kind hierarchy -> fence"])
        #expect(TraceRecord.fence(vcpu: 0).differingFields(.fence(vcpu: 0)).isEmpty)
    }

    /// Two vCPU threads: the recording interleaves their calls (forced: the threads take turns exit
    /// by exit); the replay's threads run free, vCPU 1's started first and vCPU 0's 20 ms later, so
    /// vCPU 1's thread must wait for vCPU 0's to take the records before its own (the replay's
    /// "wait for the thread whose record is next"). Both see their recorded exits, in order.
    /// The same HVCI run on sim recorded with compact exit paths (the default) and without: the
    /// same records (timestamps aside) in the same order; the compact trace is smaller and holds
    /// exit-path records; it replays with the same outcome (aRunRecordedOnSimReplaysWithTheSameOutcome).
    @Test(arguments: VMConfig.MBECMode.allCases)
    func compactExitPathsHoldTheSameRecordsAsSeparateOnes(mode: VMConfig.MBECMode) throws {
        let a = Replay.temp("separate-\(mode)"), b = Replay.temp("compact-\(mode)")
        defer { unlink(a); unlink(b) }
        let (oa, _) = try Replay.recordHVCI(a, mode: mode, compact: false)
        let (ob, _) = try Replay.recordHVCI(b, mode: mode, compact: true)
        #expect(oa == ob)
        func records(_ path: String) throws -> ([TraceRecord], TraceReader) {
            let r = try TraceReader(path: path)
            var out: [TraceRecord] = []
            while let e = try r.next() { out.append(e.record) }
            return (out, r)
        }
        let (ra, readerA) = try records(a)
        let (rb, readerB) = try records(b)
        #expect(ra == rb)
        #expect(readerA.exitPathRecords == 0 && readerB.exitPathRecords > 0)
        var sa = stat(), sb = stat()
        stat(a, &sa); stat(b, &sb)
        #expect(sb.st_size < sa.st_size, "compact \(sb.st_size) bytes, separate \(sa.st_size)")
    }

    @Test func twoVCPUThreadsReplayInTheRecordedOrder() throws {
        let path = Replay.temp("smp")
        defer { unlink(path) }
        let config = VMConfig(ramSize: 1 << 20, defaultPermissions: .all, mbecMode: .exact, backendName: "sim")
        /// vCPU k: OUT (k * 1000 + i) on port 1 for i in 0..<40, then HLT.
        func load(_ vm: VirtualMachine) throws -> [VirtualCPU] {
            try (0..<2).map { k in
                let origin = UInt64(0x1000 * (k + 1))
                var a = Assembler(origin: origin)
                a.emit(.movi, 1, 0, 40)
                a.emit(.movi, 0, 0, Int32(k * 1000))
                let loop = a.here
                a.out(0, port: 1)
                a.emit(.addi, 0, 0, 1)
                a.emit(.addi, 1, 0, -1)
                a.jnz(1, to: loop)
                a.emit(.hlt)
                try a.bytes.withUnsafeBytes { try vm.writeMemory(GPA(origin), $0) }
                let cpu = try vm.makeVCPU(index: UInt32(k))
                var r = Registers()
                r.rip = origin
                try cpu.setRegisters(r)
                return cpu
            }
        }
        /// Runs vCPU `cpu` to its halt; `turn`: take turns with the other thread exit by exit.
        @Sendable func drive(_ cpu: VirtualCPU, turn: Locked<(Int, [Bool])>?, into out: Locked<[[UInt64]]>) {
            let k = Int(cpu.index)
            while true {
                if let turn {
                    while !turn.m.withLock({ $0.0 == k || $0.1[1 - k] }) { sched_yield() }
                }
                guard let x = try? cpu.run() else { return }
                if x.reason == .io { out.m.withLock { $0[k].append(x.ioValue) } }
                let halted = x.reason != .io
                turn?.m.withLock { t in t.0 = 1 - k; if halted { t.1[k] = true } }
                if halted { return }
            }
        }
        // Recorded on sim, the threads taking turns.
        let recorder = try TraceRecorder(path: path)
        var rc = config
        rc.recorder = recorder
        let recorded = Locked<[[UInt64]]>([[], []])
        do {
            let vm = try VirtualMachine(config: rc, registry: NPTKitRuntime.makeRegistry())
            let cpus = try load(vm)
            let turn = Locked<(Int, [Bool])>((0, [false, false]))
            let threads = cpus.map { c in HostThread { drive(c, turn: turn, into: recorded) } }
            for t in threads { t.join() }
            try vm.destroy()
        }
        try recorder.finish()
        let rec = recorded.m.withLock { $0 }
        let expected: [[UInt64]] = [Array(0..<40), Array(1000..<1040)]
        #expect(rec == expected)
        // The trace holds the two vCPUs' exits interleaved.
        var order: [UInt32] = []
        let reader = try TraceReader(path: path)
        while let e = try reader.next() { if case .exit(let v, _) = e.record { order.append(v) } }
        let changes = zip(order, order.dropFirst()).filter { $0.0 != $0.1 }.count
        #expect(changes >= 40, "the recording did not interleave the vCPUs: \(order)")
        // Replayed with free threads, vCPU 1's first.
        let host = try Replay.host(path, session: path)
        var c = config
        c.backendName = "replay"
        let replayed = Locked<[[UInt64]]>([[], []])
        let vm = try host.makeVM(c)
        let cpus = try load(vm)
        let t1 = HostThread { drive(cpus[1], turn: nil, into: replayed) }
        sleepNanos(20_000_000)
        let t0 = HostThread { drive(cpus[0], turn: nil, into: replayed) }
        t1.join(); t0.join()
        try host.destroyVM(vm)
        #expect(replayed.m.withLock { $0 } == rec)
    }

    /// What the privileged section shows, without the core's clock (entry times are not replayed).
    struct PrivilegedSummary: Equatable {
        var entered: [UInt32], counts: [UInt64], heartbeats: [UInt64], outs: Int, probes: UInt64, blocked: UInt64
        var leaks: Int, moved: Int, wrongIndex: Int, failures: Int, entries: UInt64, requests: UInt64, deferred: UInt64
        var backendStats: [BackendStatistic], finalState: PMState, regionAbsent: Bool, outsideWhileVisible: UInt64
        init(_ o: PrivilegedScenario.Outcome) {
            entered = o.records.map(\.cpu); counts = o.handlerCounts; heartbeats = o.heartbeats; outs = o.heartbeatOUTs
            probes = o.probes; blocked = o.probesBlocked; leaks = o.leaks; moved = o.movedWhileVisible; wrongIndex = o.wrongIndex
            failures = o.failures; entries = o.stats.entries; requests = o.stats.requests; deferred = o.stats.deferredInterrupts
            backendStats = o.backendStatistics; finalState = o.finalState; regionAbsent = o.regionAbsentAfter
            outsideWhileVisible = o.outsideWhileVisible
        }
    }

    /// The privileged section recorded on sim (trace 1.2: with lock turns) replays with the same
    /// outcome: the same vCPUs entered in the same order, the same handler counts, heartbeats,
    /// heartbeat OUTs and blocked probes. The replay, recorded again, makes the same acquisitions of
    /// the coordinator's monitor in the same order, the same exits (the KICKED ones included),
    /// decisions and entries, and kicks the same vCPUs as often: the same vCPUs were stopped and kicked.
    @Test func thePrivilegedSectionRecordedOnSimReplaysWithTheSameOutcome() throws {
        let path = Replay.temp("priv"), again = Replay.temp("priv-again")
        defer { unlink(path); unlink(again) }
        let recorded = try Replay.recordPrivileged(path)
        #expect(recorded.stats.entries == 8 && recorded.failures == 0 && recorded.leaks == 0)
        let r = BackendRegistry()
        try r.register(SimulatorBackend(), makeDefault: true)
        _ = try NPTKitRuntime.loadPlugin(Replay.plugin, arguments: [PluginArgument(key: "trace", value: path),
                                                                    PluginArgument(key: "session", value: path),
                                                                    PluginArgument(key: "wait-ms", value: "2000")], into: r)
        let (host, recorder) = try Replay.recording(r, "replay", to: again)
        #expect(host.capabilities.contains(.privilegedMode))
        let replayed = try Replay.privileged().run(host: host, mode: .exact)
        try recorder.finish()
        #expect(PrivilegedSummary(replayed) == PrivilegedSummary(recorded))

        // What the core did in both runs: the monitor's acquisitions in one order (each is recorded
        // while the monitor is held); each vCPU's calls in its order, and the VM's invalidations (a
        // record written after its call returns may fall after another thread's); kicks as counts
        // (a kick is made after the monitor is released).
        func firstDifference(_ x: [TraceRecord], _ y: [TraceRecord]) -> String {
            guard let k = zip(x, y).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset else {
                return x.count == y.count ? "" : "lengths \(x.count) and \(y.count)"
            }
            return "#\(k): \(x[k]) / \(y[k])"
        }
        let a = try Replay.records(path), b = try Replay.records(again)
        func turns(_ rs: [TraceRecord]) -> [TraceRecord] { rs.filter { if case .lockTurn = $0 { return true } else { return false } } }
        func ofVCPU(_ rs: [TraceRecord], _ v: UInt32) -> [TraceRecord] {
            rs.filter { if case .lockTurn = $0 { return false }; if case .kick = $0 { return false }; return $0.vcpu == v && $0.direction != .vmm }
        }
        func invalidations(_ rs: [TraceRecord]) -> [TraceRecord] { rs.filter { if case .invalidate = $0 { return true } else { return false } } }
        func kicks(_ rs: [TraceRecord]) -> [UInt32: Int] {
            rs.reduce(into: [:]) { k, r in if case .kick(let v) = r { k[v, default: 0] += 1 } }
        }
        #expect(turns(a).count > 100)
        #expect(firstDifference(turns(a), turns(b)) == "")
        for v: UInt32 in 0..<3 {
            #expect(ofVCPU(a, v).count > 20)
            #expect(firstDifference(ofVCPU(a, v), ofVCPU(b, v)) == "", "vCPU \(v)")
        }
        #expect(firstDifference(invalidations(a), invalidations(b)) == "")
        #expect(kicks(a) == kicks(b))
        let kickedExits = a.filter { if case .exit(_, let x) = $0 { return x.reason == .kicked } else { return false } }.count
        #expect(kickedExits > 0, "the recording has no KICKED exit: no vCPU was stopped while in guest code")
    }

    /// A privileged decision changed in a copy of the recording (the first entry's entry point, the
    /// answer to the first RSM): the replay fails at that event, naming both records.
    @Test(arguments: ["entry", "leave"])
    func aFlippedPrivilegedDecisionIsReportedAtItsEvent(which: String) throws {
        let path = Replay.temp("priv-flip-src-\(which)"), flipped = Replay.temp("priv-flip-\(which)")
        defer { unlink(path); unlink(flipped) }
        _ = try Replay.recordPrivileged(path)
        var done = false
        let event = try Replay.rewrite(path, to: flipped) { rec in
            guard !done else { return nil }
            switch (which, rec) {
            case ("entry", .privilegedEnter(let v, let gpa, let size, let rip)):
                done = true
                return .privilegedEnter(vcpu: v, regionGPA: gpa, regionSize: size, entryRIP: rip + 8)
            case ("leave", .decision(let v, .resume, let x)) where x.reason == .leaveMode:
                done = true
                return .decision(vcpu: v, action: .tool, exit: x)
            default: return nil
            }
        }
        try #require(event != .max)
        let host = try Replay.host(flipped, session: flipped)
        var message = ""
        do {
            _ = try Replay.privileged().run(host: host, mode: .exact)
            Issue.record("the replay of a flipped privileged decision did not fail")
        } catch let e as NPTError { message = e.message }
        #expect(message.contains("diverged at event \(event) "), "\(message)")
        #expect(message.contains(which == "entry" ? "differs in: entryRIP" : "differs in: action"), "\(message)")
    }

    /// A replay asked to run past the recording (one request more than recorded): the extra
    /// request's acquisition of the monitor never gets a turn; it fails after wait-ms (200 ms here)
    /// with the acquisition and the recorded record it waited behind, never a hang.
    @Test func aPrivilegedReplayPastTheRecordingTimesOutWithAClearError() throws {
        let path = Replay.temp("priv-past")
        defer { unlink(path) }
        _ = try Replay.recordPrivileged(path)
        let host = try Replay.host(path, session: path)
        var message = ""
        do {
            _ = try Replay.privileged(requests: 3).run(host: host, mode: .exact)
            Issue.record("a replay past the recording did not fail")
        } catch let e as NPTError { message = e.message }
        // Where the recorded run's VMM thread polled whether its requests were served, this one
        // raises a third request: that raise (and every other thread, behind the same record) waits
        // for an acquisition no thread makes. The first to give up names it; the failure is sticky:
        // "... waited 200 ms for another thread to take the recorded #E (vm 0) lock-turn vmm: read".
        #expect(message.contains(" waited 200 ms for another thread to take the recorded #"), "\(message)")
        #expect(message.contains("lock-turn vmm: read"), "\(message)")
    }

    /// A replay that creates fewer VMs than recorded is a divergence, reported when the process ends
    /// (the only end of a session a plugin sees through the C ABI: it is never unloaded, and a
    /// context's end is not told to backends): the plugin's exit handler prints it with the event of
    /// the first VM never created and makes the exit status 1. Run in child processes (nptkit-cli).
    @Test func aReplayWithFewerVMsThanRecordedFailsAtTheEnd() throws {
        let cli = String(Replay.plugin.dropLast("libnptkit-replay.so".count)) + "nptkit-cli"
        try #require(access(cli, X_OK) == 0, "\(cli) is not built")
        let two = Replay.temp("two-vms"), one = Replay.temp("one-vm"), err = Replay.temp("fewer.err")
        defer { unlink(two); unlink(one); unlink(err) }
        #expect(try Replay.spawn(cli, ["bench", "--replay-record", two, "--replay-child-syscalls", "3", "--replay-record-vms", "2"], stderr: err) == 0)
        #expect(try Replay.spawn(cli, ["bench", "--replay-record", one, "--replay-child-syscalls", "3"], stderr: err) == 0)
        // One VM of one recorded: complete, status 0.
        #expect(try Replay.spawn(cli, ["bench", "--replay-child", one, "--replay-child-syscalls", "3"], stderr: err) == 0)
        // One VM of two recorded: status 1, the VM never created named with its event.
        #expect(try Replay.spawn(cli, ["bench", "--replay-child", two, "--replay-child-syscalls", "3"], stderr: err) == 1)
        let text = String(decoding: try readAll(err), as: UTF8.self)
        #expect(text.contains("created fewer VMs than recorded (1 of 2; never created: vm 1)"), "\(text)")
        #expect(text.contains("recorded: vm-create backend sim"), "\(text)")
        #expect(text.contains("diverged at event "), "\(text)")
    }

    /// The committed KVM traces load on any machine (no /dev/kvm needed): the recorded backend's
    /// capabilities and guest ISA, the privileged mode included (they have lock turns). (Their full replay against the
    /// recorded output runs in scripts/test.sh through nptkit-cli demo.)
    @Test func committedKVMTracesPresentTheRecordedBackend() throws {
        for m in ["lazy", "violation-only"] {
            let host = try Replay.host(fixture("kvm-demo-\(m).trace"), session: "caps-\(m)")
            #expect(host.guestISA == .x86_64)
            #expect(host.capabilities.contains([.run, .mbecEmulation, .persistentMemory]))
            #expect(host.capabilities.contains(.privilegedMode))
            #expect(host.backend.summary.contains("backend 'kvm'"))
        }
        // A 1.1 trace (no lock turns) of a run that used the privileged mode: withheld, its VM passed over.
        let old = try Replay.host(fixture("kvm-demo-lazy-1.1.trace"), session: "caps-1.1")
        #expect(!old.capabilities.contains(.privilegedMode))
        #expect(old.backend.summary.contains("1 VMs that used the privileged mode not replayed"))
    }
}

/// A value shared by threads.
final class Locked<T: Sendable>: Sendable {
    let m: Mutex<T>
    init(_ v: T) { m = Mutex(v) }
}

func fixture(_ name: String) -> String {
    let p = "\(#filePath)"   // .../Tests/NPTScenariosTests/ReplayTests.swift
    let dir = p.split(separator: "/", omittingEmptySubsequences: false).dropLast(2).joined(separator: "/")
    return dir + "/Fixtures/npttrace/" + name
}

func readAll(_ path: String) throws -> [UInt8] {
    guard let f = fopen(path, "rb") else { throw NPTError(.notFound, path) }
    defer { fclose(f) }
    var out: [UInt8] = [], buf = [UInt8](repeating: 0, count: 65536)
    while true { let n = fread(&buf, 1, buf.count, f); if n <= 0 { break }; out += buf[0..<n] }
    return out
}

func writeAll(_ path: String, _ b: [UInt8]) throws {
    guard let f = fopen(path, "wb") else { throw NPTError(.notFound, path) }
    _ = b.withUnsafeBytes { fwrite($0.baseAddress, 1, b.count, f) }
    fclose(f)
}
