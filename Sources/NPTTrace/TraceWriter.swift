// The streaming trace writer (docs/trace-format.md). Not thread-safe: the recording layer holds it
// under its own lock and takes each timestamp under that lock, so timestamps never go backwards.

public final class TraceWriter {
    let sink: any TraceSink
    let targetBlock: Int
    var block = ByteEncoder(capacity: 0)
    var blockBase: UInt64 = 0
    var blockCount: UInt32 = 0
    var state = ExitState()
    var scratch = ByteEncoder(capacity: 256)
    /// Bytes handed to the sink so far.
    public private(set) var bytesWritten: UInt64 = 0
    /// Records appended so far (the end record excluded).
    public private(set) var recordCount: UInt64 = 0
    public private(set) var lastTimestamp: UInt64 = 0
    public private(set) var finished = false

    /// Writes the header. `blockPayload`: the payload size a block is closed at (at most
    /// TraceFormat.maxBlockPayload); smaller blocks lose less on a crash, larger ones compress better.
    public init(sink: any TraceSink, blockPayload: Int = TraceFormat.defaultBlockPayload, minor: UInt16 = TraceFormat.minor) throws(TraceError) {
        self.sink = sink
        targetBlock = max(64, min(blockPayload, TraceFormat.maxBlockPayload))
        block.bytes.reserveCapacity(targetBlock + 64)
        var h = ByteEncoder(capacity: TraceFormat.headerSize)
        h.bytes.append(contentsOf: TraceFormat.magic)
        h.u16(TraceFormat.major)
        h.u16(minor)
        h.u32(0) // flags
        h.u32(CRC32C.checksum(h.bytes))
        try emit(h.bytes)
    }

    public convenience init(path: String, blockPayload: Int = TraceFormat.defaultBlockPayload) throws(TraceError) {
        try self.init(sink: try FileTraceSink(path: path), blockPayload: blockPayload)
    }

    func emit(_ bytes: [UInt8]) throws(TraceError) {
        let sink = self.sink
        let r = bytes.withUnsafeBytes { b in Result { () throws(TraceError) in try sink.write(b) } }
        try r.get()
        bytesWritten += UInt64(bytes.count)
    }

    /// Appends `record` at `timestamp` (ns; any clock, the same for the whole trace). Refused: a
    /// timestamp before the previous one (`.outOfOrder`), a record whose encoding exceeds
    /// TraceFormat.maxBlockPayload (split large memory writes), an `.end` record (finish() writes it),
    /// anything after finish().
    public func append(_ record: TraceRecord, at timestamp: UInt64) throws(TraceError) {
        if case .end = record { throw TraceError(.invalidRecord, at: bytesWritten, "the end record is written by finish()") }
        try put(record, at: timestamp)
    }

    func put(_ record: TraceRecord, at timestamp: UInt64) throws(TraceError) {
        guard !finished else { throw TraceError(.finished, at: bytesWritten, "append after finish()") }
        guard timestamp >= lastTimestamp else {
            throw TraceError(.outOfOrder, at: bytesWritten + UInt64(TraceFormat.blockHeaderSize + block.bytes.count),
                             "timestamp \(timestamp) ns is before the previous record's \(lastTimestamp) ns")
        }
        var attempt = 0
        while true {
            var st = state
            scratch.bytes.removeAll(keepingCapacity: true)
            TraceCodec.encode(record, &scratch, &st)
            let delta = blockCount == 0 ? 0 : timestamp - lastTimestamp
            var frame = ByteEncoder(capacity: 16)
            frame.u8(record.kind)
            frame.varint(delta)
            frame.varint(UInt64(scratch.bytes.count))
            let size = frame.bytes.count + scratch.bytes.count
            if blockCount > 0 && (block.bytes.count + size > targetBlock || blockCount == UInt32.max) && attempt == 0 {
                try flush()
                attempt = 1
                continue
            }
            guard size <= TraceFormat.maxBlockPayload else {
                throw TraceError(.invalidRecord, at: bytesWritten,
                                 "a record of \(size) bytes exceeds the \(TraceFormat.maxBlockPayload)-byte block limit")
            }
            if blockCount == 0 { blockBase = timestamp }
            block.bytes.append(contentsOf: frame.bytes)
            block.bytes.append(contentsOf: scratch.bytes)
            blockCount += 1
            state = st
            lastTimestamp = timestamp
            if case .end = record {} else { recordCount += 1 }
            return
        }
    }

    /// Closes the current block and hands it to the sink (a reader sees everything appended so far
    /// except the end record). Called automatically when a block is full.
    public func flush() throws(TraceError) {
        guard blockCount > 0 else { return }
        var h = ByteEncoder(capacity: TraceFormat.blockHeaderSize)
        h.u32(UInt32(block.bytes.count))
        h.u32(0) // CRC, below
        h.u64(blockBase)
        h.u32(blockCount)
        var crc = h.bytes.withUnsafeBytes { CRC32C.update(0, UnsafeRawBufferPointer(rebasing: $0[0..<4])) }
        crc = h.bytes.withUnsafeBytes { CRC32C.update(crc, UnsafeRawBufferPointer(rebasing: $0[8..<20])) }
        crc = block.bytes.withUnsafeBytes { CRC32C.update(crc, $0) }
        for i in 0..<4 { h.bytes[4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        try emit(h.bytes)
        try emit(block.bytes)
        block.bytes.removeAll(keepingCapacity: true)
        blockCount = 0
        state = ExitState()
    }

    /// Writes the end record (the count of records before it), flushes and closes the sink.
    /// A trace without it reads as truncated.
    public func finish() throws(TraceError) {
        guard !finished else { return }
        try put(.end(recordCount: recordCount), at: lastTimestamp)
        try flush()
        finished = true
        try sink.close()
    }
}
