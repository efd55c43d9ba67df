// The streaming trace writer (docs/trace-format.md). Not thread-safe: the recording layer holds it
// under its own lock and takes each timestamp under that lock, so timestamps never go backwards.

package final class TraceWriter {
    /// Everything a record changes, in one allocation reached through a pointer: no dynamic
    /// exclusivity check and no allocation a record (the writer is not thread-safe anyway; its user
    /// serialises the calls).
    struct State: ~Copyable {
        var block: BlockBuffer
        var blockBase: UInt64 = 0
        var blockCount: UInt32 = 0
        var exits = ExitState()
        var bytesWritten: UInt64 = 0
        var recordCount: UInt64 = 0
        var lastTimestamp: UInt64 = 0
        var finished = false

        /// Encodes `record` at the end of the block (frame and body in place): the frame's length
        /// field is written as one byte, and the body moved when its length needs more. Returns the
        /// record's size; the block's count includes the record (the caller commits it, or sets the
        /// count back and either flushes, which resets the exit state, or refuses a record too large
        /// for a block, which holds no exit: an exit record is never that large).
        @inline(__always)
        mutating func encode(_ kind: UInt8, at timestamp: UInt64, _ body: (inout BlockBuffer, inout ExitState) -> Void) -> Int {
            let start = block.count
            block.u8(kind)
            block.varint(blockCount == 0 ? 0 : timestamp - lastTimestamp)
            let lengthAt = block.count
            block.u8(0)
            body(&block, &exits)
            let body = block.count - lengthAt - 1
            if body < 0x80 {
                block.base[lengthAt] = UInt8(body)
            } else {
                var n = 1
                while UInt64(body) >> (7 * UInt64(n)) != 0 { n += 1 }
                block.shift(from: lengthAt + 1, body, by: n - 1)
                let end = block.count
                block.count = lengthAt
                block.varint(UInt64(body))
                block.count = end
            }
            return block.count - start
        }
    }

    let sink: any TraceSink
    /// The header's flags.
    package let flags: UInt32
    let targetBlock: Int
    let s: UnsafeMutablePointer<State>
    /// Bytes handed to the sink so far.
    package var bytesWritten: UInt64 { s.pointee.bytesWritten }
    /// Records appended so far (the end record excluded).
    package var recordCount: UInt64 { s.pointee.recordCount }
    package var lastTimestamp: UInt64 { s.pointee.lastTimestamp }
    package var finished: Bool { s.pointee.finished }

    /// Writes the header. `blockPayload`: the payload size a block is closed at (at most
    /// TraceFormat.maxBlockPayload); smaller blocks lose less on a crash, larger ones compress better.
    /// `flags`: header flags (TraceFormat.knownFlags); `compactExitPaths` allows `appendExitPath(vcpu:...)`.
    package init(sink: any TraceSink, blockPayload: Int = TraceFormat.defaultBlockPayload, minor: UInt16 = TraceFormat.minor,
                 flags: UInt32 = 0) throws(TraceError) {
        precondition(flags & ~TraceFormat.knownFlags == 0, "unknown trace header flags")
        self.sink = sink
        self.flags = flags
        targetBlock = max(64, min(blockPayload, TraceFormat.maxBlockPayload))
        s = .allocate(capacity: 1)
        s.initialize(to: State(block: BlockBuffer(capacity: TraceFormat.blockHeaderSize + targetBlock + 256)))
        var h = ByteEncoder(capacity: TraceFormat.headerSize)
        h.bytes.append(contentsOf: TraceFormat.magic)
        h.u16(TraceFormat.major)
        h.u16(minor)
        h.u32(flags)
        h.u32(CRC32C.checksum(h.bytes))
        try h.bytes.withUnsafeBytes { b in Result { () throws(TraceError) in try emit(b) } }.get()
    }

    deinit {
        s.deinitialize(count: 1)
        s.deallocate()
    }

    package convenience init(path: String, blockPayload: Int = TraceFormat.defaultBlockPayload) throws(TraceError) {
        try self.init(sink: try FileTraceSink(path: path), blockPayload: blockPayload)
    }

    func emit(_ bytes: UnsafeRawBufferPointer) throws(TraceError) {
        try sink.write(bytes)
        s.pointee.bytesWritten += UInt64(bytes.count)
    }

    /// Appends `record` at `timestamp` (ns; any clock, the same for the whole trace). Refused: a
    /// timestamp before the previous one (`.outOfOrder`), a record whose encoding exceeds
    /// TraceFormat.maxBlockPayload (split large memory writes), an `.end` record (finish() writes it),
    /// anything after finish().
    package func append(_ record: TraceRecord, at timestamp: UInt64) throws(TraceError) {
        if case .end = record { throw TraceError(.invalidRecord, at: bytesWritten, "the end record is written by finish()") }
        try put(record, at: timestamp)
    }

    func put(_ record: TraceRecord, at timestamp: UInt64) throws(TraceError) {
        let isEnd: Bool
        if case .end = record { isEnd = true } else { isEnd = false }
        try put(record.kind, at: timestamp, isEnd: isEnd) { TraceCodec.encode(record, &$0, &$1) }
    }

    /// The recording layer's hot path: a record of a vCPU's exit path (`exit`, `hierarchy`,
    /// `exitControls` with `value`, `decision` with `action`) encoded without building a
    /// `TraceRecord`; the same bytes as `append` of that record (TraceFormatTests checks it).
    package func appendExitPath(_ kind: ExitPathRecord, vcpu: UInt32, action: UInt8 = 0, value: UInt32 = 0, exit: TraceExit,
                                at timestamp: UInt64) throws(TraceError) {
        try put(kind.rawValue, at: timestamp, isEnd: false) { enc, st in
            enc.varint(UInt64(vcpu))
            switch kind {
            case .exit: TraceCodec.encodeExit(exit, &enc, &st)
            case .decision: enc.u8(action); TraceCodec.encodeExit(exit, &enc, &st)
            case .hierarchy, .exitControls: enc.varint(UInt64(value))
            }
        }
    }

    /// The same, stamped by the writer: an exit with a new reading of `TraceClock` (ns since
    /// `base`), the others with the latest timestamp (the core's answer to an exit carries its time).
    package func appendExitPath(_ kind: ExitPathRecord, vcpu: UInt32, action: UInt8 = 0, value: UInt32 = 0, exit: TraceExit,
                                clockSince base: UInt64) throws(TraceError) {
        let last = s.pointee.lastTimestamp
        let t = kind == .exit ? max(TraceClock.now() &- base, last) : last
        try appendExitPath(kind, vcpu: vcpu, action: action, value: value, exit: exit, at: t)
    }

    /// One vCPU's exit path in one exit-path record (trace flag `compactExitPaths`): its `exit`,
    /// the hierarchy it exposed and the exit controls it set while handling it (if it did, in that
    /// order), and the core's `action` on `decision` (the exit as decided; nil: `exit` itself, as
    /// usual), all at `timestamp`. A reader returns the records `appendExitPath(_:...)` would have
    /// written for the same calls, with the same timestamps and numbers (they count as 2 to 4 records).
    package func appendExitPath(vcpu: UInt32, exit: TraceExit, hierarchy: UInt32?, exitControls: UInt32?,
                                action: UInt8, decision: TraceExit?, at timestamp: UInt64) throws(TraceError) {
        guard flags & TraceFormat.compactExitPaths != 0 else {
            throw TraceError(.invalidRecord, at: bytesWritten, "an exit-path record needs the header flag compactExitPaths")
        }
        var parts: UInt8 = decision == nil ? 0 : TraceCodec.ExitPathPart.decisionExit
        if hierarchy != nil { parts |= TraceCodec.ExitPathPart.hierarchy }
        if exitControls != nil { parts |= TraceCodec.ExitPathPart.exitControls }
        let records: UInt64 = 2 + (hierarchy != nil ? 1 : 0) + (exitControls != nil ? 1 : 0)
        try put(RecordKind.exitPath, at: timestamp, isEnd: false, records: records) { enc, st in
            enc.varint(UInt64(vcpu))
            enc.u8(parts)
            TraceCodec.encodeExit(exit, &enc, &st)
            if let hierarchy { enc.varint(UInt64(hierarchy)) }
            if let exitControls { enc.varint(UInt64(exitControls)) }
            enc.u8(action)
            if let decision { TraceCodec.encodeExit(decision, &enc, &st) }
        }
    }

    @inline(__always)
    func put(_ kind: UInt8, at timestamp: UInt64, isEnd: Bool, records: UInt64 = 1,
             _ body: (inout BlockBuffer, inout ExitState) -> Void) throws(TraceError) {
        let s = self.s
        guard !s.pointee.finished else { throw TraceError(.finished, at: bytesWritten, "append after finish()") }
        guard timestamp >= s.pointee.lastTimestamp else {
            throw TraceError(.outOfOrder, at: s.pointee.bytesWritten + UInt64(s.pointee.block.count),
                             "timestamp \(timestamp) ns is before the previous record's \(s.pointee.lastTimestamp) ns")
        }
        var flushed = false
        while true {
            let start = s.pointee.block.count
            let size = s.pointee.encode(kind, at: timestamp, body)
            let count = s.pointee.blockCount
            if count > 0 && !flushed
                && (start - TraceFormat.blockHeaderSize + size > targetBlock || count == UInt32.max) {
                s.pointee.block.count = start
                try flush()
                flushed = true
                continue
            }
            guard size <= TraceFormat.maxBlockPayload else {
                s.pointee.block.count = start
                throw TraceError(.invalidRecord, at: bytesWritten,
                                 "a record of \(size) bytes exceeds the \(TraceFormat.maxBlockPayload)-byte block limit")
            }
            if count == 0 { s.pointee.blockBase = timestamp }
            s.pointee.blockCount = count + 1
            s.pointee.lastTimestamp = timestamp
            if !isEnd { s.pointee.recordCount += records }
            return
        }
    }

    /// Closes the current block and hands it to the sink, header and payload in one write (a reader
    /// sees everything appended so far except the end record). Called automatically when a block is full.
    package func flush() throws(TraceError) {
        guard s.pointee.blockCount > 0 else { return }
        try emit(s.pointee.block.seal(base: s.pointee.blockBase, records: s.pointee.blockCount))
        s.pointee.block.count = TraceFormat.blockHeaderSize
        s.pointee.blockCount = 0
        s.pointee.exits = ExitState()
    }

    /// Writes the end record (the count of records before it), flushes and closes the sink.
    /// A trace without it reads as truncated.
    package func finish() throws(TraceError) {
        guard !finished else { return }
        try put(.end(recordCount: recordCount), at: lastTimestamp)
        try flush()
        s.pointee.finished = true
        try sink.close()
    }
}
