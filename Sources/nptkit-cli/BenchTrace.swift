import NPTTrace
#if canImport(Glibc)
import Glibc
#endif

/// Group 9: the trace format: write and read speed (records per second) and the reader's peak
/// memory for a trace 10 times longer.
extension Bench {
    /// A syscall-heavy stream on 4 vCPUs: exits, decisions and hierarchy switches.
    static func writeBenchTrace(_ path: String, records: Int) throws -> Duration {
        let clock = ContinuousClock()
        let t0 = clock.now
        let w = try TraceWriter(path: path)
        var t: UInt64 = 1_000_000
        var i = 0
        while i < records {
            let v = UInt32(i & 3)
            let up = (i >> 2) & 1 == 0
            t += 700 + UInt64(i % 13) * 50
            let rip: UInt64 = up ? 0xffff_ffff_8100_0000 + UInt64(i % 97) * 16 : 0x40_1000 + UInt64(i % 89) * 8
            let x = TraceExit(reason: up ? .escalation : .returnToUser, cpl: up ? 3 : 0, hierarchy: up ? 1 : 0, rip: rip)
            switch i % 3 {
            case 0: try w.append(.exit(vcpu: v, x), at: t)
            case 1: try w.append(.decision(vcpu: v, action: .resume, exit: x), at: t)
            default: try w.append(.hierarchy(vcpu: v, hierarchy: up ? 0 : 1), at: t)
            }
            i += 1
        }
        try w.finish()
        return clock.now - t0
    }

    static func readBenchTrace(_ path: String) throws -> (Int, Duration) {
        let clock = ContinuousClock()
        let t0 = clock.now
        let r = try TraceReader(path: path)
        var n = 0
        var sink: UInt64 = 0
        while let e = try r.next() {
            n += 1
            if case .exit(_, let x) = e.record { sink &+= x.rip }
        }
        if sink == 42 { print("") }
        return (n, clock.now - t0)
    }

    /// Peak resident memory (VmHWM, KiB) since the last reset (writing 5 to /proc/self/clear_refs).
    static func resetPeak() { if let f = fopen("/proc/self/clear_refs", "w") { fputs("5", f); fclose(f) } }
    static func peakKiB() -> Int {
        guard let f = fopen("/proc/self/status", "r") else { return -1 }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, 256, f) != nil {
            let s = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if s.hasPrefix("VmHWM:") { return Int(s.split(separator: " ").dropFirst().first.map(String.init) ?? "") ?? -1 }
        }
        return -1
    }

    func benchTrace() throws {
        let n = quick ? 200_000 : 1_000_000
        print("9. Trace format: \(n) records (exits, decisions, hierarchy switches on 4 vCPUs), file in /tmp")
        let short = "/tmp/nptkit-bench-\(getpid())-1.trace", long = "/tmp/nptkit-bench-\(getpid())-10.trace"
        defer { unlink(short); unlink(long) }
        let wt = try Bench.writeBenchTrace(short, records: n)
        var size = stat()
        stat(short, &size)
        var reads: [Duration] = []
        for _ in 0..<(quick ? 3 : 7) { reads.append(try Bench.readBenchTrace(short).1) }
        reads.sort()
        let med = reads[reads.count / 2]
        let secs = { (d: Duration) in Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18 }
        print("  write: \(fmt(Double(n) / secs(wt) / 1e6)) M records/s; \(fmt(Double(size.st_size) / Double(n))) bytes/record")
        print("  read (median of \(reads.count)): \(fmt(Double(n + 1) / secs(med) / 1e6)) M records/s (\(fmt(secs(med) * 1000, 1)) ms)")
        _ = try Bench.writeBenchTrace(long, records: 10 * n)
        Bench.resetPeak()
        let base = Bench.peakKiB()
        _ = try Bench.readBenchTrace(short)
        let p1 = Bench.peakKiB()
        Bench.resetPeak()
        let (n10, d10) = try Bench.readBenchTrace(long)
        let p10 = Bench.peakKiB()
        print("  read \(n10) records (10x): \(fmt(Double(n10) / secs(d10) / 1e6)) M records/s; peak RSS \(p1) KiB (1x) vs \(p10) KiB (10x), ratio \(fmt(Double(p10) / Double(max(1, p1)), 3)) (process baseline \(base) KiB)")
        print("")
    }
}
