import CNPTKit
import NPTCore
import NPTSimulator
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

// MARK: per-thread error detail

private let errorKey: pthread_key_t = {
    var k = pthread_key_t()
    pthread_key_create(&k) { p in free(p) }
    return k
}()

func setLastError(_ message: String) {
    let old = pthread_getspecific(errorKey)
    pthread_setspecific(errorKey, strdup(message))
    free(old)
}

func lastErrorPointer() -> UnsafePointer<CChar> {
    if let p = pthread_getspecific(errorKey) { return UnsafePointer(p.assumingMemoryBound(to: CChar.self)) }
    let empty: StaticString = ""
    return UnsafeRawPointer(empty.utf8Start).assumingMemoryBound(to: CChar.self)
}

// MARK: a backend's error channel (npt_host_api.set_error)

/// The message a backend operation (or a plugin's init) gave through `set_error` on this thread,
/// until the core takes it after the operation returns.
private let backendErrorKey: pthread_key_t = {
    var k = pthread_key_t()
    pthread_key_create(&k) { p in free(p) }
    return k
}()

func setBackendError(_ message: UnsafePointer<CChar>?) {
    let old = pthread_getspecific(backendErrorKey)
    pthread_setspecific(backendErrorKey, message.map { strdup($0) } ?? nil)
    free(old)
}

/// The message a backend left on this thread (nil: none); the slot is emptied.
func takeBackendError() -> String? {
    guard let p = pthread_getspecific(backendErrorKey) else { return nil }
    pthread_setspecific(backendErrorKey, nil)
    defer { free(p) }
    return String(cString: p.assumingMemoryBound(to: CChar.self))
}

/// Runs `body`; maps a thrown error to its status and records the detail for `npt_last_error`.
@inline(__always)
func api(_ function: String, _ body: () throws(NPTError) -> Void) -> npt_status {
    do throws(NPTError) {
        try body()
        return NPT_OK
    } catch {
        setLastError("\(function): \(error.message)")
        return npt_status(rawValue: error.code.rawValue)
    }
}

func require<T>(_ p: T?, _ name: String) throws(NPTError) -> T {
    guard let p else { throw .invalid("\(name) is NULL") }
    return p
}

// MARK: calls from inside a backend operation

/// Which C backend operations run on this thread, by the VM handle they serve. A backend operation
/// runs while the core holds the VM's locks (the policy during `invalidate`, the privileged-mode
/// coordinator during an entry, ...): a call on the same VM from inside it must not wait for them.
/// So from inside an operation of a VM, only the calls that take none of those locks are allowed on
/// that VM (npt_policy_get, npt_hierarchy_translate, npt_hierarchy_leaves, npt_vm_get_stats); any
/// other call on it, and any destroy, is refused with NPT_ERR_STATE instead of deadlocking or
/// aborting ("Recursive call to lock Mutex").
enum Callout {
    private final class Stack { var entries: [(vm: UInt, op: StaticString)] = [] }
    private static let key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in if let p { Unmanaged<AnyObject>.fromOpaque(p).release() } }
        return k
    }()

    private static func stack() -> Stack {
        if let p = pthread_getspecific(key) { return Unmanaged<Stack>.fromOpaque(p).takeUnretainedValue() }
        let s = Stack()
        pthread_setspecific(key, Unmanaged.passRetained(s as AnyObject).toOpaque())
        return s
    }

    /// Runs a backend operation `op` of the VM with handle `vm`.
    @inline(__always)
    static func around<T>(_ vm: UInt, _ op: StaticString, _ body: () -> T) -> T {
        let s = stack()
        // A message a backend gave through set_error belongs to the operation that gave it: one
        // left over from an earlier operation that then succeeded must not explain this one's failure.
        if s.entries.isEmpty { _ = takeBackendError() }
        s.entries.append((vm, op))
        defer { s.entries.removeLast() }
        return body()
    }

    /// The operation of VM `vm` running on this thread, if any.
    static func operation(of vm: UInt) -> StaticString? {
        guard let p = pthread_getspecific(key) else { return nil }
        return Unmanaged<Stack>.fromOpaque(p).takeUnretainedValue().entries.last { $0.vm == vm }?.op
    }

    /// Any backend operation running on this thread.
    static var current: (vm: UInt, op: StaticString)? {
        guard let p = pthread_getspecific(key) else { return nil }
        return Unmanaged<Stack>.fromOpaque(p).takeUnretainedValue().entries.last
    }

    /// Refuses a destroy from inside any backend operation (it would wait for that operation).
    static func refuseDestroy(_ what: String) throws(NPTError) {
        if let c = current {
            throw NPTError(.state, "\(what) called from inside the backend operation '\(c.op)' (a destroy would wait for that operation to return); destroy after it returns")
        }
    }
}

// MARK: handles

/// Live objects behind the opaque handles. A handle is a never-reused token, so a destroyed or
/// forged handle is refused instead of dereferenced. The objects' own lifetimes (the core's VM and
/// vCPU, the context's `Lifetime`) decide a race between a call and a destroy; the table only
/// finds the object.
enum Handles {
    private struct Table { var next: UInt = 1; var objects: [UInt: any AnyObject & Sendable] = [:] }
    private static let table = NPTMutex(Table())
    private static let base: UInt = 0x4E50_0000_0000 // "NP"

    static func reserve() -> OpaquePointer {
        let id = table.withLock { t -> UInt in defer { t.next += 1 }; return t.next }
        return OpaquePointer(bitPattern: base + id * 16)!
    }
    static func bind(_ h: OpaquePointer, _ o: any AnyObject & Sendable) {
        let key = UInt(bitPattern: h)
        table.withLock { $0.objects[key] = o }
    }
    static func make(_ o: any AnyObject & Sendable) -> OpaquePointer { let h = reserve(); bind(h, o); return h }
    static func remove(_ h: OpaquePointer) {
        let key = UInt(bitPattern: h)
        table.withLock { _ = $0.objects.removeValue(forKey: key) }
    }

    /// The live object behind `h`. `reentrant`: the call is one of those allowed from inside a
    /// backend operation of the same VM (Callout).
    static func get<T: AnyObject>(_ h: OpaquePointer?, _ type: T.Type, _ name: String, reentrant: Bool = false) throws(NPTError) -> T {
        guard let h else { throw .invalid("\(name) is NULL") }
        let key = UInt(bitPattern: h)
        let o = table.withLock { $0.objects[key] }
        guard let t = o as? T else { throw NPTError(.badHandle, "\(name) \(h) is not a live \(name) handle") }
        if !reentrant {
            let vm: UInt? = (t as? VMBox).map { UInt(bitPattern: $0.handle) } ?? (t as? VCPUBox).map { UInt(bitPattern: $0.vm.handle) }
            if let vm, let op = Callout.operation(of: vm) {
                throw NPTError(.state, "called from inside the backend operation '\(op)' of the same VM: from there only npt_policy_get, npt_hierarchy_translate, npt_hierarchy_leaves and npt_vm_get_stats may be called on it (anything else waits for locks the operation's caller holds)")
            }
        }
        return t
    }
}

// MARK: versioned structs

/// A struct that starts with its `size`, with the smallest size a published header gave it
/// (CallTable.generated.swift conforms every one of them, from Tests/C/abi/*).
protocol NPTVersioned { static var firstPublishedSize: Int { get } }

/// Reads a caller's struct whose first field is its size (ABI growth, include/nptkit.h): any size
/// from the first published one upward is accepted; the library reads only what the caller has
/// (at most what it knows) and takes the members the caller's size does not cover as 0.
func readVersioned<T: NPTVersioned>(_ p: UnsafePointer<T>?, _ name: String) throws(NPTError) -> T {
    guard let p else { throw .invalid("\(name) is NULL") }
    let size = Int(UnsafeRawPointer(p).load(as: UInt32.self))
    if size == MemoryLayout<T>.size { return p.pointee }
    guard size >= T.firstPublishedSize else {
        throw .invalid("\(name)->size is \(size), expected at least \(T.firstPublishedSize) (sizeof(\(T.self)) in the oldest header that has it)")
    }
    return withUnsafeTemporaryAllocation(byteCount: MemoryLayout<T>.size, alignment: MemoryLayout<T>.alignment) { b in
        b.initializeMemory(as: UInt8.self, repeating: 0)
        b.baseAddress!.copyMemory(from: UnsafeRawPointer(p), byteCount: min(size, MemoryLayout<T>.size))
        return b.baseAddress!.load(as: T.self)
    }
}

/// A caller's struct that `writeVersioned` will accept, and its declared size: checked before a
/// call that changes something (a recorded lock turn) and then writes its answer.
@discardableResult
func writableVersioned<T: NPTVersioned>(_ p: UnsafeMutablePointer<T>?, _ name: String) throws(NPTError) -> (UnsafeMutablePointer<T>, Int) {
    guard let p else { throw .invalid("\(name) is NULL") }
    let size = Int(UnsafeRawPointer(p).load(as: UInt32.self))
    guard size >= T.firstPublishedSize else {
        throw .invalid("\(name)->size is \(size), expected at least \(T.firstPublishedSize) (sizeof(\(T.self)) in the oldest header that has it)")
    }
    return (p, size)
}

/// Writes `value` into a caller's struct, never past the caller's declared size (the `size` member
/// keeps the caller's value). The same sizes as readVersioned are accepted.
func writeVersioned<T: NPTVersioned>(_ value: T, _ p: UnsafeMutablePointer<T>?, _ name: String) throws(NPTError) {
    let (p, size) = try writableVersioned(p, name)
    var v = value
    withUnsafeMutableBytes(of: &v) { b in
        b.storeBytes(of: UInt32(size), as: UInt32.self)
        UnsafeMutableRawPointer(p).copyMemory(from: b.baseAddress!, byteCount: min(size, MemoryLayout<T>.size))
    }
}

// MARK: conversions

extension Registers {
    init(_ r: npt_regs) {
        self.init()
        cpl = r.cpl; rip = r.rip; rflags = r.rflags
        gpr = withUnsafeBytes(of: r.gpr) { Array($0.bindMemory(to: UInt64.self)) }
        cr0 = r.cr0; cr2 = r.cr2; cr3 = r.cr3; cr4 = r.cr4; efer = r.efer
        lstar = r.lstar; faultHandler = r.fault_handler
    }
    var c: npt_regs {
        var r = npt_regs()
        r.size = UInt32(MemoryLayout<npt_regs>.size)
        r.cpl = cpl; r.rip = rip; r.rflags = rflags
        withUnsafeMutableBytes(of: &r.gpr) { b in
            for i in 0..<16 { b.storeBytes(of: i < gpr.count ? gpr[i] : 0, toByteOffset: i * 8, as: UInt64.self) }
        }
        r.cr0 = cr0; r.cr2 = cr2; r.cr3 = cr3; r.cr4 = cr4; r.efer = efer
        r.lstar = lstar; r.fault_handler = faultHandler
        return r
    }
}

/// A C `size_t` as Swift sees it (`Int`, so 2^63 and up arrive negative) back as the unsigned
/// value the caller passed, for checks and messages.
@inline(__always) func sizeArg(_ v: Int) -> UInt { UInt(bitPattern: v) }

extension VMExit {
    init(_ e: npt_exit) throws(NPTError) {
        guard let reason = Reason(rawValue: e.reason) else { throw .invalid("exit->reason \(e.reason) is not an npt_exit_reason") }
        guard let h = HierarchyID(rawValue: e.hierarchy) else { throw .invalid("exit->hierarchy \(e.hierarchy) is unknown") }
        self.init(reason: reason)
        gpa = GPA(e.gpa); gva = GVA(e.gva); qualification = e.qualification; vector = e.vector
        cpl = e.cpl; hierarchy = h; ioPort = e.io_port; ioValue = e.io_value; rip = e.rip
    }
    var c: npt_exit {
        var e = npt_exit()
        e.size = UInt32(MemoryLayout<npt_exit>.size)
        e.reason = reason.rawValue; e.gpa = gpa.raw; e.gva = gva.raw; e.qualification = qualification
        e.vector = vector; e.cpl = cpl; e.hierarchy = hierarchy.rawValue; e.io_port = ioPort
        e.io_value = ioValue; e.rip = rip
        return e
    }
}

/// A backend operation's status: NPT_OK, or an error with the backend's own message (set_error).
/// A message left by an operation that succeeded is dropped.
func status(_ s: npt_status, _ what: @autoclosure () -> String) throws(NPTError) {
    let detail = takeBackendError()
    guard s != NPT_OK else { return }
    let code = NPTError.Code(rawValue: s.rawValue) ?? .backend
    // The description is made only for a failure: a backend call's success path builds no string.
    throw NPTError(code, detail.map { "\(what()): \($0)" } ?? what())
}

// MARK: backend statistics

/// Statistic names as C strings that live for the process (one copy per distinct name).
private let statisticNames = NPTMutex<[String: UInt]>([:])

func statisticName(_ name: String) -> UnsafePointer<CChar> {
    let address = statisticNames.withLock { names in
        if let p = names[name] { return p }
        let p = UInt(bitPattern: strdup(name))
        names[name] = p
        return p
    }
    return UnsafePointer(bitPattern: address)!
}

/// The npt_vm_backend_stats contract: *count always; the pairs only when they all fit.
func copyStatistics(_ list: [BackendStatistic], _ out: UnsafeMutablePointer<npt_backend_stat>?, _ capacity: Int,
                    _ count: UnsafeMutablePointer<Int>?) throws(NPTError) {
    let count = try require(count, "count")
    let cap = sizeArg(capacity)
    guard out != nil || cap == 0 else { throw .invalid("stats is NULL with cap \(cap)") }
    count.pointee = list.count
    guard cap >= UInt(list.count) else {
        throw NPTError(.bufferTooSmall, "\(list.count) statistics, room for \(cap)")
    }
    guard let out else { return }
    for (i, s) in list.enumerated() { out[i] = npt_backend_stat(name: statisticName(s.name), value: s.value) }
}
