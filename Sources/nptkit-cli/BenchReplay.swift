import NPTCore
import NPTKit
import NPTScenarios
import NPTTrace
#if canImport(Glibc)
import Glibc
#endif

/// Group 10: recording and replay (issue 14). The workload is the HVCI scenario's system-call loop
/// (exact mode on sim, lazy on KVM), driven by a loop that counts instead of keeping what the guest
/// printed, so the driver's own memory does not grow with the trace.
extension Bench {
    /// Runs a prepared HVCI vCPU to its halt as `HVCIScenario.drive` does (a violation is injected
    /// as #VE), keeping nothing: the number of exits.
    static func driveCounting(_ cpu: VirtualCPU) throws(NPTError) -> Int {
        var exits = 0
        while true {
            let x = try cpu.run()
            exits += 1
            switch x.reason {
            case .halt: return exits
            case .mbecViolation: try cpu.injectFault(vector: virtualizationExceptionVector, errorCode: x.qualification, address: x.gva.raw)
            case .io, .kicked, .budget: continue
            default: throw NPTError(.state, "bench: unexpected exit \(x)")
            }
        }
    }

    /// One HVCI run of `syscalls` system calls on `backend` of `registry`, recorded to `record` if
    /// given: the exits the driver saw, the backend's exits (the core's count) and the wall time of the run (VM made, loaded, run to its halt, destroyed;
    /// the recorder's final fsync is not in it).
    static func hvciRun(_ registry: BackendRegistry, backend: String, mode: VMConfig.MBECMode, syscalls: Int,
                        record: String? = nil, compact: Bool = true) throws -> (exits: Int, backendExits: UInt64, time: Duration, threadCPU: UInt64, processCPU: UInt64) {
        let recorder = try record.map { try TraceRecorder(path: $0, compactExitPaths: compact) }
        let scenario = HVCIScenario(syscalls: syscalls)
        let backendISA = try registry.lookup(backend).guestISA
        var config = try HVCIScenario.image(for: backendISA).config(mode: mode)
        config.backendName = backend
        config.recorder = recorder
        let clock = ContinuousClock()
        let t0 = clock.now
        let (c0, p0) = (cpuNanos(CLOCK_THREAD_CPUTIME_ID), cpuNanos(CLOCK_PROCESS_CPUTIME_ID))
        let vm = try NPTKitRuntime.makeVM(config: config, registry: registry)
        let exits: Int
        let backendExits: UInt64
        do {
            exits = try driveCounting(try scenario.prepare(vm))
            backendExits = vm.statistics().exitsTotal
        } catch {
            try? NPTKitRuntime.destroyVM(vm)
            throw error
        }
        try NPTKitRuntime.destroyVM(vm)
        let t = clock.now - t0
        let c = cpuNanos(CLOCK_THREAD_CPUTIME_ID) - c0
        try recorder?.finish()
        // The process's CPU time includes the encoder's work for this run (finish waited for it).
        let p = cpuNanos(CLOCK_PROCESS_CPUTIME_ID) - p0
        return (exits, backendExits, t, c, p)
    }

    /// CPU time of `clock` (the calling thread's, or the process's), ns.
    static func cpuNanos(_ clock: clockid_t) -> UInt64 {
        var ts = timespec()
        clock_gettime(clock, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// A registry with the simulator and the replay plugin (beside this binary) replaying `trace`
    /// in a session of its own (a session is one pass).
    static func replayRegistry(_ trace: String, session: String) throws -> BackendRegistry {
        guard let dir = executableDirectory(), access(dir + "/libnptkit-replay.so", R_OK) == 0 else {
            throw NPTError(.unsupported, "libnptkit-replay.so is not beside this binary")
        }
        let r = NPTKitRuntime.makeRegistry()
        try NPTKitRuntime.loadPlugin(dir + "/libnptkit-replay.so", arguments: [PluginArgument(key: "trace", value: trace),
                                                                             PluginArgument(key: "session", value: session)], into: r)
        return r
    }

    /// The child of the memory measurement (`bench --replay-child TRACE --replay-child-syscalls N`):
    /// one replay, then exit; the parent reads its peak RSS from wait4.
    static func replayChild(_ trace: String, syscalls: Int) throws {
        let r = try replayRegistry(trace, session: "child")
        _ = try hvciRun(r, backend: "replay", mode: .exact, syscalls: syscalls)
    }

    /// `bench --replay-record TRACE --replay-child-syscalls N --replay-record-vms K`: K HVCI runs on
    /// sim (exact mode, one VM each) recorded to one trace (what `--replay-child` replays, and a
    /// trace of more VMs than it replays for the test of a short replay).
    static func recordHVCIRuns(_ trace: String, syscalls: Int, vms: Int) throws {
        let recorder = try TraceRecorder(path: trace)
        let sim = NPTKitRuntime.makeRegistry()
        for _ in 0..<vms {
            var config = try HVCIScenario.image(for: .simulator).config(mode: .exact)
            config.backendName = "sim"
            config.recorder = recorder
            let vm = try NPTKitRuntime.makeVM(config: config, registry: sim)
            _ = try driveCounting(try HVCIScenario(syscalls: syscalls).prepare(vm))
            _ = vm.statistics()
            try NPTKitRuntime.destroyVM(vm)
        }
        try recorder.finish()
    }

    /// Runs this executable as a replay child of `trace`; its peak RSS (ru_maxrss, KiB).
    static func childPeakKiB(_ trace: String, syscalls: Int) throws -> Int {
        let exe = "/proc/self/exe"
        let args = [exe, "bench", "--replay-child", trace, "--replay-child-syscalls", "\(syscalls)"]
        var argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, exe, nil, nil, &argv, environ) == 0 else { throw NPTError(.backend, "cannot start \(exe)") }
        var status: Int32 = 0
        var ru = rusage()
        guard wait4(pid, &status, 0, &ru) == pid, status == 0 else {
            throw NPTError(.backend, "the replay child of '\(trace)' failed (wait status \(status))")
        }
        return ru.ru_maxrss
    }

    /// p50 (p10-p90) of `xs` with `show`.
    static func spreadOf(_ xs: [Double], _ show: (Double) -> String) -> String {
        let s = xs.sorted()
        func p(_ q: Double) -> Double { s[min(s.count - 1, Int(q * Double(s.count - 1) + 0.5))] }
        return "\(show(p(0.5))) (\(show(p(0.1)))-\(show(p(0.9))))"
    }

    /// Discards what a writer hands it (the writer's own cost, without the file's).
    final class NullSink: TraceSink {
        func write(_ bytes: UnsafeRawBufferPointer) throws(TraceError) {}
        func close() throws(TraceError) {}
    }

    /// Record `k` (0..<10) of one system call of the HVCI loop on sim in exact mode (3 exits, 10
    /// records), made where it is written as the recording layer does.
    @inline(__always) static func syscallRecord(_ k: Int, _ i: UInt64) -> TraceRecord {
        let kernel: UInt64 = 0xffff_8000_0010_1000, user: UInt64 = 0x40_0028
        let up = TraceExit(reason: .escalation, cpl: 0, hierarchy: 1, rip: kernel)
        let io = TraceExit(reason: .io, cpl: 0, hierarchy: 0, ioPort: 0xE9, ioValue: i, rip: kernel + 0x108)
        let down = TraceExit(reason: .returnToUser, cpl: 3, hierarchy: 0, rip: user)
        switch k {
        case 0: return .exit(vcpu: 0, up)
        case 1: return .hierarchy(vcpu: 0, hierarchy: 0)
        case 2: return .exitControls(vcpu: 0, controls: 2)
        case 3: return .decision(vcpu: 0, action: .resume, exit: up)
        case 4: return .exit(vcpu: 0, io)
        case 5: return .decision(vcpu: 0, action: .tool, exit: io)
        case 6: return .exit(vcpu: 0, down)
        case 7: return .hierarchy(vcpu: 0, hierarchy: 1)
        case 8: return .exitControls(vcpu: 0, controls: 1)
        default: return .decision(vcpu: 0, action: .resume, exit: down)
        }
    }

    /// The three exits of system call `i` of the HVCI loop on sim in exact mode, as the backend
    /// returns them (the recording layer converts each for the trace).
    @inline(__always) static func syscallExits(_ i: UInt64) -> (VMExit, VMExit, VMExit) {
        let kernel: UInt64 = 0xffff_8000_0010_1000, user: UInt64 = 0x40_0028
        var up = VMExit(reason: .escalation); up.hierarchy = .user; up.rip = kernel
        var io = VMExit(reason: .io); io.ioPort = 0xE9; io.ioValue = i; io.rip = kernel + 0x108
        var down = VMExit(reason: .returnToUser); down.cpl = 3; down.rip = user
        return (up, io, down)
    }

    /// ns a record: the writer alone (timestamps given, a sink that discards), the recorder (its
    /// lock and writer, and its clock read at each exit record as the recording layer does), one
    /// read of the recorder's clock (TraceClock.now) and one of clock_gettime; medians of `rounds`.
    static func recordCosts(records: Int, rounds: Int) throws -> (writer: [Double], recorder: [Double], clock: [Double], gettime: [Double],
                                                                  pathWriter: [Double], pathRecorder: [Double]) {
        let clock = ContinuousClock()
        /// ns an item: `step(i)` does the items from `i` on and says how many, until `n` are done.
        func timed(_ n: Int, _ step: (Int) throws -> Int) rethrows -> Double {
            let t0 = clock.now
            var i = 0
            while i < n { i += try step(i) }
            return seconds(clock.now - t0) * 1e9 / Double(i)
        }
        var w: [Double] = [], r: [Double] = [], c: [Double] = [], g: [Double] = [], pw: [Double] = [], pr: [Double] = []
        for _ in 0..<rounds {
            let writer = try TraceWriter(sink: NullSink())
            var t: UInt64 = 0
            w.append(try timed(records) { i in
                for k in 0..<10 { t += 250; try writer.append(syscallRecord(k, UInt64(i)), at: t) }
                return 10
            })
            let recorder = try TraceRecorder(sink: NullSink())
            r.append(try timed(records) { i in
                for k in 0..<10 { try recorder.append(syscallRecord(k, UInt64(i)), vm: 0, readClock: k == 0 || k == 4 || k == 6) }
                return 10
            })
            var sink: UInt64 = 0
            c.append(timed(records) { _ in sink &+= TraceClock.now(); return 1 })
            g.append(timed(records) { _ in sink &+= TraceClock.monotonicNanoseconds(); return 1 })
            if sink == 42 { print("") }
            // The hot path: the loop's three exit paths a system call, each one exit-path record
            // (as the recorder writes them when nothing comes between), encoded by the writer alone.
            let compact = try TraceWriter(sink: NullSink(), flags: TraceFormat.compactExitPaths)
            t = 0
            pw.append(try timed(records) { i in
                let (up, io, down) = syscallExits(UInt64(i))
                t += 250; try compact.appendExitPath(vcpu: 0, exit: TraceExit(up), hierarchy: 0, exitControls: 2, action: TraceAction.resume.rawValue, decision: nil, at: t)
                t += 250; try compact.appendExitPath(vcpu: 0, exit: TraceExit(io), hierarchy: nil, exitControls: nil, action: TraceAction.tool.rawValue, decision: nil, at: t)
                t += 250; try compact.appendExitPath(vcpu: 0, exit: TraceExit(down), hierarchy: 1, exitControls: 1, action: TraceAction.resume.rawValue, decision: nil, at: t)
                return 3
            })
            // The same exit paths as the recording layer hands them to the recorder: its calls at
            // the exit (a clock read), the hierarchy, the exit controls and the decision.
            let held = try TraceRecorder(sink: NullSink())
            pr.append(try timed(records) { i in
                let (up, io, down) = syscallExits(UInt64(i))
                try held.appendExitPath(.exit, vm: 0, vcpu: 0, exit: up)
                try held.appendExitPath(.hierarchy, vm: 0, vcpu: 0, value: 0)
                try held.appendExitPath(.exitControls, vm: 0, vcpu: 0, value: 2)
                try held.appendExitPath(.decision, vm: 0, vcpu: 0, action: TraceAction.resume.rawValue, exit: up)
                try held.appendExitPath(.exit, vm: 0, vcpu: 0, exit: io)
                try held.appendExitPath(.decision, vm: 0, vcpu: 0, action: TraceAction.tool.rawValue, exit: io)
                try held.appendExitPath(.exit, vm: 0, vcpu: 0, exit: down)
                try held.appendExitPath(.hierarchy, vm: 0, vcpu: 0, value: 1)
                try held.appendExitPath(.exitControls, vm: 0, vcpu: 0, value: 1)
                try held.appendExitPath(.decision, vm: 0, vcpu: 0, action: TraceAction.resume.rawValue, exit: down)
                return 3
            })
        }
        return (w, r, c, g, pw, pr)
    }

    func benchReplay() throws {
        let syscalls = quick ? 2_000 : 50_000
        let rounds = quick ? 3 : 9
        print("10. Recording and replay (HVCI system-call loop; exact mode on sim, lazy on KVM; files in /tmp; load average \(loadAverage().text))")
        let pid = getpid()
        let short = "/tmp/nptkit-bench-replay-\(pid)-1.trace", long = "/tmp/nptkit-bench-replay-\(pid)-10.trace"
        defer { unlink(short); unlink(long) }
        let sim = NPTKitRuntime.makeRegistry()
        let recorded = try Bench.hvciRun(sim, backend: "sim", mode: .exact, syscalls: syscalls, record: short)
        let records = try TraceReader(path: short)
        while try records.next() != nil {}
        let n = Double(records.recordIndex)
        print("   trace: \(syscalls) system calls, \(recorded.backendExits) backend exits (\(recorded.exits) returned to the driver), \(records.recordIndex) records")

        // (a) Replay speed: plugin and core (the driver's calls answered and compared), and the
        // reader alone on the same file, interleaved.
        var replayRates: [Double] = [], readerRates: [Double] = []
        for k in 0..<rounds {
            let r = try Bench.replayRegistry(short, session: "bench-\(k)")
            let (exits, _, t, _, _) = try Bench.hvciRun(r, backend: "replay", mode: .exact, syscalls: syscalls)
            guard exits == recorded.exits else { throw NPTError(.state, "bench: the replay made \(exits) exits, the recording \(recorded.exits)") }
            replayRates.append(n / seconds(t))
            let (m, rt) = try Bench.readBenchTrace(short)
            readerRates.append(Double(m) / seconds(rt))
        }
        let mps = { (x: Double) in fmt(x / 1e6) + " M" }
        var t = Table(["what", "events/s p50 (p10-p90)", "n", "goal 1 M/s"])
        t.add(["replay: plugin + core + driver", Bench.spreadOf(replayRates, mps), "\(rounds)", replayRates.sorted()[rounds / 2] >= 1e6 ? "met" : "NOT met"])
        t.add(["reader alone (TraceReader.next)", Bench.spreadOf(readerRates, mps), "\(rounds)", "-"])
        print(t.render())

        // (b) Memory: peak RSS of a child process replaying the trace, and one 10 times longer.
        _ = try Bench.hvciRun(sim, backend: "sim", mode: .exact, syscalls: 10 * syscalls, record: long)
        var size1 = stat(), size10 = stat()
        stat(short, &size1); stat(long, &size10)
        let p1 = try Bench.childPeakKiB(short, syscalls: syscalls)
        let p10 = try Bench.childPeakKiB(long, syscalls: 10 * syscalls)
        let ratio = Double(p10) / Double(max(1, p1))
        print("   peak RSS of a child replaying it: \(p1) KiB (\(size1.st_size / 1024) KiB trace) vs \(p10) KiB for 10x (\(size10.st_size / 1024) KiB trace): ratio \(fmt(ratio, 3)), goal within 10%: \(abs(ratio - 1) <= 0.10 ? "met" : "NOT met")")

        // (c) Recording overhead per exit, recorded and not recorded rounds interleaved.
        var o = Table(["backend", "not recorded / exit p50 (p10-p90)", "recorded / exit p50 (p10-p90)", "n", "backend exits / run", "recorded / not (p50 of pairs)", "goal < 5%", "vCPU thread CPU, recorded / not", "process CPU, recorded / not"])
        func overhead(_ registry: BackendRegistry, _ backend: String, _ mode: VMConfig.MBECMode, syscalls: Int, rounds: Int,
                      compact: Bool = true) throws {
            let path = "/tmp/nptkit-bench-replay-\(pid)-rec.trace"
            defer { unlink(path) }
            var plain: [Double] = [], rec: [Double] = [], ratios: [Double] = [], threadRatios: [Double] = [], processRatios: [Double] = []
            var exits: UInt64 = 0
            for _ in 0..<rounds {
                let a = try Bench.hvciRun(registry, backend: backend, mode: mode, syscalls: syscalls)
                let b = try Bench.hvciRun(registry, backend: backend, mode: mode, syscalls: syscalls, record: path, compact: compact)
                exits = a.backendExits
                plain.append(seconds(a.time) * 1e9 / Double(a.backendExits)); rec.append(seconds(b.time) * 1e9 / Double(b.backendExits))
                ratios.append(rec.last! / plain.last!)
                threadRatios.append(Double(b.threadCPU) / Double(max(1, a.threadCPU)))
                processRatios.append(Double(b.processCPU) / Double(max(1, a.processCPU)))
            }
            let ns = { (x: Double) in nanos(UInt64(x)) }
            let r = ratios.sorted()[rounds / 2]
            o.add([compact ? backend : backend + ", separate records", Bench.spreadOf(plain, ns), Bench.spreadOf(rec, ns), "\(rounds)", "\(exits)", fmt(r, 3), r < 1.05 ? "met" : "NOT met",
                   fmt(threadRatios.sorted()[rounds / 2], 3), fmt(processRatios.sorted()[rounds / 2], 3)])
        }
        try overhead(sim, "sim", .exact, syscalls: syscalls, rounds: rounds)
        // The same without exit-path records (each exit path as 2 to 4 records, as trace 1.2 has them).
        try overhead(sim, "sim", .exact, syscalls: syscalls, rounds: rounds, compact: false)
        let costs = try Bench.recordCosts(records: quick ? 100_000 : 2_000_000, rounds: rounds)
        let ns1 = { (x: Double) in fmt(x, 1) + " ns" }
        print("   a record of the sim loop's (exit, hierarchy, exit-controls, decision): writer alone \(Bench.spreadOf(costs.writer, ns1)), recorder (lock, writer, a clock read an exit) \(Bench.spreadOf(costs.recorder, ns1)); n = \(rounds)")
        print("   an exit path of the sim loop's, as one exit-path record: writer alone \(Bench.spreadOf(costs.pathWriter, ns1)); through the recorder's exit-path calls (lock at each, the exit held back, a clock read an exit) \(Bench.spreadOf(costs.pathRecorder, ns1)); n = \(rounds)")
        print("   the recorder's clock (\(TraceClock.name)): \(Bench.spreadOf(costs.clock, ns1)) a read; clock_gettime(CLOCK_MONOTONIC) \(Bench.spreadOf(costs.gettime, ns1))")
        if let dir = executableDirectory(), access(dir + "/libnptkit-kvm.so", R_OK) == 0 {
            let kvm = NPTKitRuntime.makeRegistry()
            try NPTKitRuntime.loadPlugin(dir + "/libnptkit-kvm.so", into: kvm)
            do { try overhead(kvm, "kvm", .lazy, syscalls: quick ? 50 : 500, rounds: rounds) } catch {
                print("   KVM: SKIPPED: \(error)")
            }
        } else {
            print("   KVM: SKIPPED: libnptkit-kvm.so is not beside this binary")
        }
        print(o.render())
        print("   load average at the end: \(loadAverage().text)\n")
    }
}
