// Where trace bytes come from and go to: a file descriptor or memory. No Foundation.
import CNPTTraceFast
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Bytes a trace is read from.
package protocol TraceSource: AnyObject {
    /// Fills `buffer` from the current position; returns fewer bytes only at the end of the data.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(TraceError) -> Int
}

/// Bytes a trace is written to.
package protocol TraceSink: AnyObject {
    func write(_ bytes: UnsafeRawBufferPointer) throws(TraceError)
    /// Makes what was written durable (fsync for a file); called by `TraceWriter.finish`.
    func close() throws(TraceError)
}

package final class MemoryTraceSource: TraceSource {
    let bytes: [UInt8]
    var pos = 0
    package init(_ bytes: [UInt8]) { self.bytes = bytes }
    package func read(into buffer: UnsafeMutableRawBufferPointer) throws(TraceError) -> Int {
        let n = min(buffer.count, bytes.count - pos)
        if n > 0 {
            bytes.withUnsafeBytes { src in
                buffer.baseAddress!.copyMemory(from: src.baseAddress! + pos, byteCount: n)
            }
        }
        pos += n
        return n
    }
}

package final class MemoryTraceSink: TraceSink {
    package private(set) var bytes: [UInt8] = []
    package init() {}
    package func write(_ b: UnsafeRawBufferPointer) throws(TraceError) { bytes.append(contentsOf: b) }
    package func close() throws(TraceError) {}
}

func errnoText() -> String { String(cString: strerror(errno)) }

/// Reads a file (or a pipe) through its descriptor.
package final class FileTraceSource: TraceSource {
    let fd: Int32
    var offset: UInt64 = 0
    package let path: String
    package init(path: String) throws(TraceError) {
        self.path = path
        fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw TraceError(.io, at: 0, "cannot open \(path): \(errnoText())") }
    }
    deinit { _ = Glibc.close(fd) }
    package func read(into buffer: UnsafeMutableRawBufferPointer) throws(TraceError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = Glibc.read(fd, buffer.baseAddress! + done, buffer.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw TraceError(.io, at: offset + UInt64(done), "reading \(path): \(errnoText())")
            }
            if n == 0 { break }
            done += n
        }
        offset += UInt64(done)
        return done
    }
}

/// Writes a file (created or truncated, mode 0644).
package final class FileTraceSink: TraceSink {
    let fd: Int32
    var offset: UInt64 = 0
    package let path: String
    package init(path: String) throws(TraceError) {
        self.path = path
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TraceError(.io, at: 0, "cannot create \(path): \(errnoText())") }
    }
    deinit { _ = Glibc.close(fd) }
    package func write(_ b: UnsafeRawBufferPointer) throws(TraceError) {
        var done = 0
        while done < b.count {
            let n = Glibc.write(fd, b.baseAddress! + done, b.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw TraceError(.io, at: offset + UInt64(done), "writing \(path): \(errnoText())")
            }
            done += n
        }
        offset += UInt64(done)
    }
    package func close() throws(TraceError) {
        if fsync(fd) != 0 && errno != EINVAL { throw TraceError(.io, at: offset, "fsync \(path): \(errnoText())") }
    }
}

/// The clock a recorder should stamp records with (name it in a `meta` record "clock").
package enum TraceClock {
    /// CLOCK_MONOTONIC in nanoseconds.
    package static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// The time stamp counter scaled to CLOCK_MONOTONIC's nanoseconds where it can stand for it
    /// (`TSCClock.usable`), calibrated once a process; nil elsewhere.
    static let tsc: TSCClock? = TSCClock.usable(cpuFlags: TSCClock.cpuFlags(), clocksource: TSCClock.clocksource())
        ? TSCClock.calibrate() : nil

    /// Nanoseconds on CLOCK_MONOTONIC's scale: from the TSC where `tsc` is set (a third of a
    /// clock_gettime on this project's machine, bench 10), else clock_gettime.
    @inline(__always) package static func now() -> UInt64 {
        if let t = tsc { return t.nanoseconds() }
        return monotonicNanoseconds()
    }

    /// What `now()` reads, for a trace's `clock` meta record.
    package static var name: String {
        guard let t = tsc else { return "CLOCK_MONOTONIC" }
        return "TSC (invariant; the kernel's clocksource) scaled to CLOCK_MONOTONIC, \(t.calibrationNs / 1000) us calibration, \(t.megahertz) MHz"
    }
}

/// The time stamp counter as a clock: `baseNs + (tsc - baseTSC) * mult / 2^32`.
struct TSCClock {
    let baseTSC: UInt64
    let baseNs: UInt64
    /// Nanoseconds a tick, times 2^32.
    let mult: UInt64
    let calibrationNs: UInt64

    @inline(__always) func nanoseconds() -> UInt64 {
        let (hi, lo) = (nptrace_rdtsc() &- baseTSC).multipliedFullWidth(by: mult)
        return baseNs &+ (hi << 32 | lo >> 32)
    }
    var megahertz: UInt64 { (UInt64(1) << 32) * 1000 / max(1, mult) }

    /// Only on x86-64, with an invariant TSC (the `constant_tsc` and `nonstop_tsc` flags: the same
    /// rate at every P- and C-state) that the kernel itself keeps time with (clocksource `tsc`: it
    /// found the TSC synchronised across CPUs and its watchdog has not demoted it). Elsewhere (a
    /// guest on kvm-clock, an unsynchronised host, another ISA) a TSC reading on one CPU need not
    /// be comparable with one on another, and the recorder keeps clock_gettime.
    static func usable(cpuFlags: [Substring], clocksource: String) -> Bool {
#if arch(x86_64)
        return cpuFlags.contains("constant_tsc") && cpuFlags.contains("nonstop_tsc") && clocksource == "tsc"
#else
        return false
#endif
    }

    /// The first `flags` line of /proc/cpuinfo, split.
    static func cpuFlags() -> [Substring] {
        guard let text = readSmallFile("/proc/cpuinfo", limit: 1 << 16),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") }),
              let colon = line.firstIndex(of: ":") else { return [] }
        return line[line.index(after: colon)...].split(separator: " ")
    }
    static func clocksource() -> String {
        readSmallFile("/sys/devices/system/clocksource/clocksource0/current_clocksource", limit: 64)?
            .split(separator: "\n").first.map(String.init) ?? ""
    }

    /// TSC and CLOCK_MONOTONIC read together: the pair whose TSC reads bracket the clock_gettime
    /// most tightly of a few.
    static func pair() -> (tsc: UInt64, ns: UInt64) {
        var best: (UInt64, UInt64) = (0, 0)
        var width = UInt64.max
        for _ in 0..<5 {
            let a = nptrace_rdtsc(), ns = TraceClock.monotonicNanoseconds(), b = nptrace_rdtsc()
            if b &- a < width { width = b &- a; best = (a / 2 + b / 2, ns) }
        }
        return best
    }

    /// The rate over `ns` of CLOCK_MONOTONIC (spinning); nil if the TSC did not advance.
    static func calibrate(ns: UInt64 = 2_000_000) -> TSCClock? {
        let a = pair()
        var b = pair()
        while b.ns &- a.ns < ns { b = pair() }
        let ticks = b.tsc &- a.tsc
        guard ticks > 0, b.tsc > a.tsc else { return nil }
        let mult = ((b.ns - a.ns) << 32) / ticks
        guard mult > 0 else { return nil }
        return TSCClock(baseTSC: b.tsc, baseNs: b.ns, mult: mult, calibrationNs: b.ns - a.ns)
    }
}

/// A small text file (procfs, sysfs) or nil.
func readSmallFile(_ path: String, limit: Int) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { _ = Glibc.close(fd) }
    var buf = [UInt8](repeating: 0, count: limit)
    var n = 0
    while n < limit {
        let r = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + n, limit - n) }
        if r < 0 && errno == EINTR { continue }
        if r <= 0 { break }
        n += r
    }
    return String(decoding: buf[0..<n], as: UTF8.self)
}
