// Where trace bytes come from and go to: a file descriptor or memory. No Foundation.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Bytes a trace is read from.
public protocol TraceSource: AnyObject {
    /// Fills `buffer` from the current position; returns fewer bytes only at the end of the data.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(TraceError) -> Int
}

/// Bytes a trace is written to.
public protocol TraceSink: AnyObject {
    func write(_ bytes: UnsafeRawBufferPointer) throws(TraceError)
    /// Makes what was written durable (fsync for a file); called by `TraceWriter.finish`.
    func close() throws(TraceError)
}

public final class MemoryTraceSource: TraceSource {
    let bytes: [UInt8]
    var pos = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(TraceError) -> Int {
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

public final class MemoryTraceSink: TraceSink {
    public private(set) var bytes: [UInt8] = []
    public init() {}
    public func write(_ b: UnsafeRawBufferPointer) throws(TraceError) { bytes.append(contentsOf: b) }
    public func close() throws(TraceError) {}
}

func errnoText() -> String { String(cString: strerror(errno)) }

/// Reads a file (or a pipe) through its descriptor.
public final class FileTraceSource: TraceSource {
    let fd: Int32
    var offset: UInt64 = 0
    public let path: String
    public init(path: String) throws(TraceError) {
        self.path = path
        fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw TraceError(.io, at: 0, "cannot open \(path): \(errnoText())") }
    }
    deinit { _ = Glibc.close(fd) }
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(TraceError) -> Int {
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
public final class FileTraceSink: TraceSink {
    let fd: Int32
    var offset: UInt64 = 0
    public let path: String
    public init(path: String) throws(TraceError) {
        self.path = path
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TraceError(.io, at: 0, "cannot create \(path): \(errnoText())") }
    }
    deinit { _ = Glibc.close(fd) }
    public func write(_ b: UnsafeRawBufferPointer) throws(TraceError) {
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
    public func close() throws(TraceError) {
        if fsync(fd) != 0 && errno != EINVAL { throw TraceError(.io, at: offset, "fsync \(path): \(errnoText())") }
    }
}

/// The clock a recorder should stamp records with (name it in a `meta` record "clock").
public enum TraceClock {
    /// CLOCK_MONOTONIC in nanoseconds.
    public static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
