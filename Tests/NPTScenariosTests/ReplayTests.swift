import NPTCore
import NPTKit
import NPTScenarios
import NPTSimulator
import NPTTrace
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
    static func recordHVCI(_ path: String, mode: VMConfig.MBECMode) throws -> (HVCIScenario.Outcome, VMStatistics) {
        let recorder = try TraceRecorder(path: path)
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

    /// A copy of `path` with the `which`-th hierarchy decision flipped; its event number.
    static func flipHierarchy(_ path: String, to out: String, which: Int) throws -> UInt64 {
        let r = try TraceReader(path: path)
        let w = try TraceWriter(path: out)
        var seen = 0
        var flipped: UInt64 = .max
        while let e = try r.next() {
            if case .end = e.record { break }
            var rec = e.record
            if case .hierarchy(let v, let h) = rec {
                if seen == which { rec = .hierarchy(vcpu: v, hierarchy: 1 - h); flipped = e.index }
                seen += 1
            }
            try w.append(rec, at: e.timestamp)
        }
        try w.finish()
        return flipped
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
    @Test(arguments: [0, 3])
    func aFlippedDecisionIsReportedAtItsEvent(which: Int) throws {
        let path = Replay.temp("flip-src-\(which)"), flipped = Replay.temp("flip-\(which)")
        defer { unlink(path); unlink(flipped) }
        _ = try Replay.recordHVCI(path, mode: .exact)
        let event = try Replay.flipHierarchy(path, to: flipped, which: which)
        try #require(event != .max)
        let host = try Replay.host(flipped, session: flipped)
        do {
            _ = try HVCIScenario(syscalls: 5).run(host: host, mode: .exact)
            Issue.record("the replay of a flipped decision did not fail")
        } catch let e as NPTError {
            #expect(e.message.contains("diverged at event \(event) "), "\(e.message)")
            #expect(e.message.contains("recorded: hierarchy vcpu 0"), "\(e.message)")
            #expect(e.message.contains("replayed: hierarchy vcpu 0"), "\(e.message)")
            #expect(e.message.contains("before it:"), "\(e.message)")
        }
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

    /// The committed KVM traces load on any machine (no /dev/kvm needed): the recorded backend's
    /// capabilities and guest ISA, without the privileged mode. (Their full replay against the
    /// recorded output runs in scripts/test.sh through nptkit-cli demo.)
    @Test func committedKVMTracesPresentTheRecordedBackend() throws {
        for m in ["lazy", "violation-only"] {
            let host = try Replay.host(fixture("kvm-demo-\(m).trace"), session: "caps-\(m)")
            #expect(host.guestISA == .x86_64)
            #expect(host.capabilities.contains([.run, .mbecEmulation, .persistentMemory]))
            #expect(!host.capabilities.contains(.privilegedMode))
            #expect(host.backend.summary.contains("backend 'kvm'"))
        }
    }
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
