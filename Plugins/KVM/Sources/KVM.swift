// Thin typed wrappers over /dev/kvm, in the style of swift-system: one type per handle, methods
// that throw `Errno`, file descriptors closed in `deinit` (or earlier by `close()`).
import CKVM
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Result of a raw ioctl: the value, or the `Errno` it failed with.
@inline(__always)
func kvmCheck(_ r: CInt) throws(Errno) -> CInt {
    if r < 0 { throw Errno(rawValue: errno) }
    return r
}

/// A file descriptor this process owns; closed once.
final class KVMHandle {
    private(set) var fd: FileDescriptor?
    init(_ fd: FileDescriptor) { self.fd = fd }
    var raw: CInt { fd?.rawValue ?? -1 }
    func close() {
        if let fd { try? fd.close() }
        fd = nil
    }
    deinit { close() }

    func ioctl(_ req: UInt, _ arg: UnsafeMutableRawPointer?) throws(Errno) -> CInt {
        try kvmCheck(ckvm_ioctl(raw, req, arg))
    }
    func ioctl(_ req: UInt, int arg: UInt) throws(Errno) -> CInt {
        try kvmCheck(ckvm_ioctl_int(raw, req, arg))
    }
}

/// `/dev/kvm`: the system handle.
final class KVMSystem {
    let handle: KVMHandle

    /// Opens `/dev/kvm` (ENOENT when there is no KVM, EACCES without permission).
    init(path: FilePath = "/dev/kvm") throws(Errno) {
        do {
            handle = KVMHandle(try FileDescriptor.open(path, .readWrite, options: [.closeOnExec]))
        } catch let e as Errno {
            throw e
        } catch {
            throw Errno.ioError
        }
    }

    func close() { handle.close() }

    var apiVersion: Int32 { get throws(Errno) { try handle.ioctl(ckvm_req_get_api_version(), int: 0) } }

    func checkExtension(_ cap: Int32) throws(Errno) -> Int32 {
        try handle.ioctl(ckvm_req_check_extension(), int: UInt(cap))
    }

    var vcpuMmapSize: Int { get throws(Errno) { Int(try handle.ioctl(ckvm_req_get_vcpu_mmap_size(), int: 0)) } }

    /// KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU.
    func msrIndexList() throws(Errno) -> [UInt32] {
        var n: UInt32 = 64
        while true {
            let b = UnsafeMutableRawPointer.allocate(byteCount: 4 + 4 * Int(n), alignment: 4)
            defer { b.deallocate() }
            b.storeBytes(of: n, as: UInt32.self)
            do {
                _ = try handle.ioctl(ckvm_req_get_msr_index_list(), b)
                let got = b.load(as: UInt32.self)
                return (0..<Int(got)).map { b.load(fromByteOffset: 4 + 4 * $0, as: UInt32.self) }
            } catch where error == .argListTooLong && n < 65536 {
                n = max(n * 2, b.load(as: UInt32.self))
            }
        }
    }

    func createVM() throws(Errno) -> KVMVirtualMachine {
        let fd = try handle.ioctl(ckvm_req_create_vm(), int: 0)
        return KVMVirtualMachine(system: self, fd: FileDescriptor(rawValue: fd))
    }

    /// KVM_GET_SUPPORTED_CPUID, as a kvm_cpuid2 buffer ready for KVM_SET_CPUID2.
    func supportedCPUID() throws(Errno) -> KVMCPUID {
        var n = 128
        while true {
            let c = KVMCPUID(entries: n)
            do {
                _ = try handle.ioctl(ckvm_req_get_supported_cpuid(), c.buffer)
                return c
            } catch where error == .argListTooLong && n < 4096 {
                n *= 2
            }
        }
    }
}

/// A kvm_cpuid2 with room for `entries` entries (a flexible array member, so raw memory).
final class KVMCPUID {
    let buffer: UnsafeMutableRawPointer
    init(entries: Int) {
        let size = MemoryLayout<kvm_cpuid2>.size + entries * MemoryLayout<kvm_cpuid_entry2>.stride
        buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        buffer.storeBytes(of: UInt32(entries), as: UInt32.self) // nent
    }
    deinit { buffer.deallocate() }

    /// KVM's paravirtual features (CPUID 0x40000001 EAX: kvmclock, steal time, async page faults,
    /// PV EOI, ...) hidden: their per-vCPU state would be split between a vCPU's views (Views.swift).
    func hideParavirtualFeatures() {
        let n = Int(buffer.load(as: UInt32.self))
        let base = buffer + MemoryLayout<kvm_cpuid2>.size
        for i in 0..<n {
            let e = (base + i * MemoryLayout<kvm_cpuid_entry2>.stride).assumingMemoryBound(to: kvm_cpuid_entry2.self)
            if e.pointee.function == 0x4000_0001 { e.pointee.eax = 0 }
        }
    }
}

/// A VM (`KVM_CREATE_VM`).
final class KVMVirtualMachine {
    let system: KVMSystem
    let handle: KVMHandle
    init(system: KVMSystem, fd: FileDescriptor) { self.system = system; handle = KVMHandle(fd) }
    func close() { handle.close() }

    /// KVM_SET_USER_MEMORY_REGION: slot `slot` maps `size` bytes at `host` to `gpa` (size 0 deletes it).
    func setUserMemoryRegion(slot: UInt32, flags: UInt32 = 0, gpa: UInt64, size: UInt64,
                             host: UnsafeMutableRawPointer?) throws(Errno) {
        var r = kvm_userspace_memory_region()
        r.slot = slot
        r.flags = flags
        r.guest_phys_addr = gpa
        r.memory_size = size
        r.userspace_addr = UInt64(UInt(bitPattern: host))
        _ = try handle.ioctl(ckvm_req_set_user_memory_region(), &r)
    }

    func checkExtension(_ cap: Int32) throws(Errno) -> Int32 {
        try handle.ioctl(ckvm_req_check_extension(), int: UInt(cap))
    }

    /// KVM_ENABLE_CAP on the VM.
    func enableCap(_ cap: UInt32, _ arg0: UInt64) throws(Errno) {
        var c = kvm_enable_cap()
        c.cap = cap
        c.args.0 = arg0
        _ = try handle.ioctl(ckvm_req_enable_cap(), &c)
    }

    /// KVM_GET_DIRTY_LOG of memslot `slot` into `bitmap` (one bit per page of the memslot, cleared by
    /// the call). A VM ioctl: no vCPU is loaded (0.5-0.9 µs here, Tests/probes/kvm/probe_coherence.c).
    func dirtyLog(slot: UInt32, into bitmap: UnsafeMutableRawPointer) throws(Errno) {
        var d = kvm_dirty_log()
        d.slot = slot
        d.dirty_bitmap = bitmap
        _ = try handle.ioctl(ckvm_req_get_dirty_log(), &d)
    }

    func createVCPU(id: UInt32) throws(Errno) -> KVMVirtualCPU {
        let fd = KVMHandle(FileDescriptor(rawValue: try handle.ioctl(ckvm_req_create_vcpu(), int: UInt(id))))
        let size = try system.vcpuMmapSize
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.raw, 0), p != MAP_FAILED else {
            throw Errno(rawValue: errno)
        }
        do {
            return try KVMVirtualCPU(handle: fd, run: p.assumingMemoryBound(to: kvm_run.self), runSize: size)
        } catch {
            munmap(p, size)
            throw error
        }
    }
}

/// A vCPU (`KVM_CREATE_VCPU`) and its mmap'd `kvm_run`.
///
/// Its registers, system registers and events are kept in `kvm_run->s.regs` (KVM_CAP_SYNC_REGS):
/// KVM stores them there at the end of every KVM_RUN, and the plugin's changes go there too, with
/// the matching bit in `kvm_dirty_regs` so that the next KVM_RUN loads them before it runs the
/// guest. Reading or changing them costs no ioctl (a vCPU ioctl costs ~4.5 µs on this machine,
/// docs/kvm-on-this-machine.md B1/B2); a change that KVM refuses (an invalid state) makes that
/// KVM_RUN fail instead of the change. The copy is filled once from KVM_GET_* at creation.
final class KVMVirtualCPU {
    let handle: KVMHandle
    let run: UnsafeMutablePointer<kvm_run>
    let runSize: Int
    let sync: UnsafeMutablePointer<kvm_sync_regs>
    init(handle: KVMHandle, run: UnsafeMutablePointer<kvm_run>, runSize: Int) throws(Errno) {
        self.handle = handle; self.run = run; self.runSize = runSize
        sync = ckvm_run_sync(run)
        ckvm_run_set_valid_regs(run, ckvm_sync_all())
        _ = try handle.ioctl(ckvm_req_get_regs(), &sync.pointee.regs)
        _ = try handle.ioctl(ckvm_req_get_sregs(), &sync.pointee.sregs)
        _ = try handle.ioctl(ckvm_req_get_vcpu_events(), &sync.pointee.events)
    }
    deinit {
        munmap(run, runSize)
        handle.close()
    }

    /// KVM_RUN. Throws EINTR when a signal or `immediate_exit` ended it before an exit.
    func runOnce() throws(Errno) { _ = try handle.ioctl(ckvm_req_run(), int: 0) }

    // The synchronized state (no ioctl). The getters keep the `throws` of the ioctl versions they
    // replaced; they do not throw.
    var regs: kvm_regs { get throws(Errno) { sync.pointee.regs } }
    func setRegs(_ r: kvm_regs) throws(Errno) {
        sync.pointee.regs = r
        ckvm_run_mark_dirty(run, ckvm_sync_regs_bit())
    }
    var sregs: kvm_sregs { get throws(Errno) { sync.pointee.sregs } }
    func setSregs(_ s: kvm_sregs) throws(Errno) {
        sync.pointee.sregs = s
        ckvm_run_mark_dirty(run, ckvm_sync_sregs_bit())
    }
    var events: kvm_vcpu_events { get throws(Errno) { sync.pointee.events } }
    func setEvents(_ e: kvm_vcpu_events) throws(Errno) {
        sync.pointee.events = e
        ckvm_run_mark_dirty(run, ckvm_sync_events_bit())
    }

    func setCPUID(_ c: KVMCPUID) throws(Errno) { _ = try handle.ioctl(ckvm_req_set_cpuid2(), c.buffer) }

    /// KVM_ENABLE_CAP on the vCPU.
    func enableCap(_ cap: UInt32, _ arg0: UInt64) throws(Errno) {
        var c = kvm_enable_cap()
        c.cap = cap
        c.args.0 = arg0
        _ = try handle.ioctl(ckvm_req_enable_cap(), &c)
    }

    /// KVM_GET_XSAVE2 into `buffer` (`xsaveSize` bytes), KVM_SET_XSAVE from it.
    func getXSAVE(into buffer: UnsafeMutableRawPointer) throws(Errno) { _ = try handle.ioctl(ckvm_req_get_xsave2(), buffer) }
    func setXSAVE(from buffer: UnsafeMutableRawPointer) throws(Errno) { _ = try handle.ioctl(ckvm_req_set_xsave(), buffer) }

    var xcrs: kvm_xcrs {
        get throws(Errno) { var x = kvm_xcrs(); _ = try handle.ioctl(ckvm_req_get_xcrs(), &x); return x }
    }
    func setXCRS(_ x: kvm_xcrs) throws(Errno) { var x = x; _ = try handle.ioctl(ckvm_req_set_xcrs(), &x) }

    var debugRegs: kvm_debugregs {
        get throws(Errno) { var d = kvm_debugregs(); _ = try handle.ioctl(ckvm_req_get_debugregs(), &d); return d }
    }
    func setDebugRegs(_ d: kvm_debugregs) throws(Errno) { var d = d; _ = try handle.ioctl(ckvm_req_set_debugregs(), &d) }

    /// KVM_GET_MSRS of `indices`: the values, as many as KVM read (it stops at the first it cannot).
    func msrs(_ indices: [UInt32]) throws(Errno) -> [UInt64] {
        let b = MSRList(indices)
        let n = try handle.ioctl(ckvm_req_get_msrs(), b.buffer)
        return (0..<Int(n)).map { b.data($0) }
    }
    /// KVM_SET_MSRS of `values` at `indices`: how many KVM wrote (it stops at the first it refuses).
    func setMSRs(_ indices: [UInt32], _ values: [UInt64]) throws(Errno) -> Int {
        let b = MSRList(indices, values)
        return Int(try handle.ioctl(ckvm_req_set_msrs(), b.buffer))
    }

    /// One MSR (KVM_GET_MSRS with nmsrs = 1).
    func msr(_ index: UInt32) throws(Errno) -> UInt64 {
        var m = MSRBuffer(index: index, data: 0)
        let n = try withUnsafeMutableBytes(of: &m) { (b) throws(Errno) -> CInt in
            try handle.ioctl(ckvm_req_get_msrs(), b.baseAddress)
        }
        guard n == 1 else { throw Errno.ioError }
        return m.data
    }
    func setMSR(_ index: UInt32, _ value: UInt64) throws(Errno) {
        var m = MSRBuffer(index: index, data: value)
        let n = try withUnsafeMutableBytes(of: &m) { (b) throws(Errno) -> CInt in
            try handle.ioctl(ckvm_req_set_msrs(), b.baseAddress)
        }
        guard n == 1 else { throw Errno.ioError }
    }
}

/// struct kvm_msrs with one struct kvm_msr_entry, laid out as the kernel expects.
struct MSRBuffer {
    var nmsrs: UInt32 = 1
    var pad: UInt32 = 0
    var index: UInt32
    var reserved: UInt32 = 0
    var data: UInt64
    init(index: UInt32, data: UInt64) { self.index = index; self.data = data }
}

/// A struct kvm_msrs with `n` entries (a flexible array member, so raw memory).
final class MSRList {
    let buffer: UnsafeMutableRawPointer
    let count: Int
    init(_ indices: [UInt32], _ values: [UInt64]? = nil) {
        count = indices.count
        let size = 8 + 16 * count
        buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        buffer.storeBytes(of: UInt32(count), as: UInt32.self)
        for (i, index) in indices.enumerated() {
            buffer.storeBytes(of: index, toByteOffset: 8 + 16 * i, as: UInt32.self)
            buffer.storeBytes(of: values?[i] ?? 0, toByteOffset: 8 + 16 * i + 8, as: UInt64.self)
        }
    }
    func data(_ i: Int) -> UInt64 { buffer.load(fromByteOffset: 8 + 16 * i + 8, as: UInt64.self) }
    deinit { buffer.deallocate() }
}

/// Anonymous shared memory for guest RAM.
final class GuestMemory {
    let base: UnsafeMutableRawPointer
    let size: Int
    init(size: Int) throws(Errno) {
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              p != MAP_FAILED else { throw Errno(rawValue: errno) }
        base = p; self.size = size
    }
    deinit { munmap(base, size) }

    /// The range [gpa, gpa+len) if it lies inside, else nil (overflow-safe).
    func contains(_ gpa: UInt64, _ len: Int) -> Bool {
        let (end, o) = gpa.addingReportingOverflow(UInt64(len))
        return !o && end <= UInt64(size)
    }
}
