// Persistent memory on KVM (NPT_CAP_PERSISTENT_MEMORY): NVDIMM ranges backed by a file (or a real
// NVDIMM region where the host has one), the vFHA as a KVM_MEM_READONLY memslot when the host
// needs WPQ flushing, and physical flushes as msync (or a region's deep_flush).
//
// Host regions (per plugin load, discovered once, at the first host_pmem_count):
//  - real NVDIMM regions, as the core's one host discovery finds them in the libnvdimm sysfs tree
//    (argument nd-root, default /sys/bus/nd/devices): the plugin does not read sysfs itself but
//    calls npt_host_api.host_pmem_discover_sysfs (ABI 1.2; a host table whose size does not cover it,
//    i.e. an older core, has none, and the plugin then finds no real region). Each region is reported
//    as the core found it: id N of regionN, base, length, controller count, flush targets (address 0)
//    and needs_wpq_flush (flush hints and no persistence_domain holding the WPQs); a physical flush
//    writes "1" to ROOT/regionN/deep_flush. Attaching them is not implemented (NPT_ERR_UNSUPPORTED: it
//    would need the region's namespace device); this machine has none.
//  - otherwise ONE file-backed region: id 1, an unlinked temp file in `pmem-dir` (default /tmp) of
//    `pmem-size` bytes (default 64 MiB; ftruncate'd), base 0 (a file has no system-physical
//    address), controller 0 with flush target address 0, and needs_wpq_flush = 1: a file's dirty
//    pages are durable only after msync/fdatasync, which is this backend's WPQ drain.
//    `pmem-needs-flush=0` makes it report 0, to show the path without exits: a claim of ADR the
//    file does not have (its pages reach the disk when the kernel writes them back), the weaker
//    guarantee Plugins/KVM/README.md names.
//
// Memslots: NVDIMM ranges and the vFHA use slot ids from `pmemFirstSlot` up (the RAM layouts use ids
// from 0). The vFHA's memslot is in every layout. An NVDIMM range is mapped (to its file mapping,
// never to RAM) by one memslot per run of pages: attach_pmem maps the whole range, and each layout
// install (Layout.swift, syncPmemRuns) keeps exactly the runs the installed hierarchy lets the
// guest execute (READONLY where it does not let it write), like RAM. The pages left out exit as
// KVM_EXIT_MMIO (data, completed from the file mapping after the R/W check) or fail emulation
// (fetches: NPT_EXIT_EPT_VIOLATION), exactly as RAM pages left out do (VCPU.swift).
import CKVM
import CNPTKit
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

let capPersistentMemory: UInt64 = 1 << 6   // NPT_CAP_PERSISTENT_MEMORY
let eptqWrite: UInt64 = 1 << 1             // NPT_EPTQ_WRITE
let eptqReadable: UInt64 = 1 << 3          // NPT_EPTQ_READABLE
let kvmMemReadonly: UInt32 = 1 << 1        // KVM_MEM_READONLY
/// Memslot ids of NVDIMM ranges and the vFHA (the layouts use ids from 0; KVM_CAP_NR_MEMSLOTS is
/// 32764 here).
let pmemFirstSlot: UInt32 = 30000

// MARK: host discovery

struct HostPmemRegion: Sendable {
    enum Kind: Sendable {
        /// The plugin's backing file (an unlinked temp file kept open for the process's life).
        case file(fd: Int32)
        /// A real NVDIMM region: its deep_flush file, and what the core's discovery said of it.
        case nd(deepFlush: String, controllers: UInt32, targets: [npt_flush_target], needsWPQFlush: Bool)
    }
    var id: UInt32
    var base: UInt64
    var length: UInt64
    var kind: Kind
}

func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func parseNumber(_ s: String) -> UInt64? {
    if s.hasPrefix("0x") || s.hasPrefix("0X") { return UInt64(s.dropFirst(2), radix: 16) }
    return UInt64(s)
}

/// Whether the core's table has `member`: one added by a later minor ABI is there only when the
/// table's size covers it (an older core gives a shorter table).
func hostHas<T>(_ host: UnsafePointer<npt_host_api>, _ member: KeyPath<npt_host_api, T>) -> Bool {
    guard let offset = MemoryLayout<npt_host_api>.offset(of: member) else { return false }
    return Int(host.pointee.size) >= offset + MemoryLayout<T>.size
}

/// The core's detail of its last failed call on this thread, if its table has last_error (ABI 1.2).
func hostLastError(_ host: UnsafePointer<npt_host_api>) -> String {
    guard hostHas(host, \.last_error), let f = host.pointee.last_error, let p = f() else { return "" }
    return String(cString: p)
}

extension KVMPlugin {
    /// Real NVDIMM regions, from the core's discovery (npt_host_api.host_pmem_discover_sysfs) of the
    /// libnvdimm tree at the `nd-root` argument (default: the core's, /sys/bus/nd/devices). None when the
    /// host table has no discovery (a core older than ABI 1.2) or the tree does not exist (no libnvdimm).
    func discoverNDRegions() -> Result<[HostPmemRegion], PmemError> {
        guard hostHas(host, \.host_pmem_discover_sysfs),
              let discover = host.pointee.host_pmem_discover_sysfs else { return .success([]) }
        let root = config.ndRoot
        var regions: [npt_sysfs_pmem_region] = []
        var targets: [npt_flush_target] = []
        var status = NPT_ERR_BUFFER_TOO_SMALL
        // A region may appear between the call that counts and the one that fills: ask again.
        for _ in 0..<4 where status == NPT_ERR_BUFFER_TOO_SMALL {
            var nr = 0, nt = 0
            status = root.withCString { discover($0, nil, 0, &nr, nil, 0, &nt) }
            if status == NPT_ERR_BUFFER_TOO_SMALL || (status == NPT_OK && (nr > 0 || nt > 0)) {
                regions = [npt_sysfs_pmem_region](repeating: npt_sysfs_pmem_region(), count: nr)
                targets = [npt_flush_target](repeating: npt_flush_target(), count: nt)
                status = root.withCString { r in
                    regions.withUnsafeMutableBufferPointer { rb in
                        targets.withUnsafeMutableBufferPointer { tb in discover(r, rb.baseAddress, nr, &nr, tb.baseAddress, nt, &nt) }
                    }
                }
            }
        }
        if status == NPT_ERR_NOT_FOUND { return .success([]) }
        guard status == NPT_OK else {
            return .failure(PmemError(status, "host NVDIMM discovery in \(root): \(hostLastError(host))"))
        }
        return .success(regions.map { r in
            let first = Int(r.first_target), n = Int(r.flush_target_count)
            let ts = first + n <= targets.count ? Array(targets[first..<(first + n)]) : []
            return HostPmemRegion(id: r.id, base: r.base, length: r.length,
                                  kind: .nd(deepFlush: root + "/region\(r.id)/deep_flush", controllers: r.controller_count,
                                            targets: ts, needsWPQFlush: r.needs_wpq_flush != 0))
        })
    }

    /// The plugin's file-backed region (id 1): `pmem-size` bytes in `pmem-dir` (arguments checked at init).
    func createFileRegion() -> Result<HostPmemRegion, PmemError> {
        let dir = config.pmemDir
        let size = config.pmemSize
        var template = Array((dir + "/nptkit-kvm-pmem-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else {
            return .failure(PmemError(NPT_ERR_BACKEND, "cannot create the NVDIMM backing file in \(dir): errno \(errno)"))
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        // Unlinked at once: nothing is left behind; the open descriptor keeps the file.
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let e = errno
            close(fd)
            return .failure(PmemError(NPT_ERR_BACKEND, "ftruncate of the NVDIMM backing file to \(size) bytes: errno \(e)"))
        }
        return .success(HostPmemRegion(id: 1, base: 0, length: size, kind: .file(fd: fd)))
    }

    func hostRegions() -> Result<[HostPmemRegion], PmemError> {
        hostPmem.withLock { st in
            if let st { return .success(st) }
            let nd: [HostPmemRegion]
            switch discoverNDRegions() {
            case .success(let r): nd = r
            case .failure(let e): return .failure(e)
            }
            if !nd.isEmpty { st = nd; return .success(nd) }
            switch createFileRegion() {
            case .success(let r): st = [r]; return .success([r])
            case .failure(let e): return .failure(e)
            }
        }
    }

    func hostPmemCount(_ count: UnsafeMutablePointer<Int>?) -> npt_status {
        guard let count else { return fail(NPT_ERR_INVALID_ARGUMENT, "host_pmem_count: NULL count") }
        switch hostRegions() {
        case .success(let r): count.pointee = r.count; return NPT_OK
        case .failure(let e): return fail(e.status, "host_pmem_count: " + e.message)
        }
    }

    func hostPmemGet(_ index: Int, _ region: UnsafeMutablePointer<npt_host_pmem_region>?,
                     _ targets: UnsafeMutablePointer<npt_flush_target>?, _ cap: Int) -> npt_status {
        guard let region else { return fail(NPT_ERR_INVALID_ARGUMENT, "host_pmem_get: NULL region") }
        let regions: [HostPmemRegion]
        switch hostRegions() {
        case .success(let r): regions = r
        case .failure(let e): return fail(e.status, "host_pmem_get: " + e.message)
        }
        guard index < regions.count else { return fail(NPT_ERR_NOT_FOUND, "host_pmem_get: index \(index) of \(regions.count)") }
        let r = regions[index]
        region.pointee.id = r.id
        region.pointee.base = r.base
        region.pointee.length = r.length
        let ts: [npt_flush_target]
        switch r.kind {
        case .file:
            region.pointee.needs_wpq_flush = config.pmemNeedsFlush ? 1 : 0
            region.pointee.controller_count = 1
            ts = [npt_flush_target(controller: 0, reserved: 0, address: 0)]
        case .nd(_, let controllers, let targets, let needs):
            region.pointee.needs_wpq_flush = needs ? 1 : 0
            region.pointee.controller_count = controllers
            ts = targets
        }
        region.pointee.flush_target_count = UInt32(ts.count)
        if let targets {
            for (i, t) in ts.prefix(max(0, cap)).enumerated() { targets[i] = t }
        }
        return NPT_OK
    }
}

struct PmemError: Error {
    var status: npt_status
    var message: String
    init(_ s: npt_status, _ m: String) { status = s; message = m }
}

// MARK: per VM

/// A MAP_SHARED mapping of part of the backing file; unmapped when released.
final class FileMapping: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let size: Int
    init(fd: Int32, offset: UInt64, size: Int) throws(Errno) {
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(offset)), p != MAP_FAILED else {
            throw Errno(rawValue: errno)
        }
        base = p; self.size = size
    }
    deinit { munmap(base, size) }
}

struct PmemAttachment {
    /// The range (its memslots are per view: KVMView.pmemRuns; a run at gpa maps the file mapping at
    /// gpa - range.gpa).
    var range: MappedRange
    var region: UInt32
    var mapping: FileMapping
}

struct PmemVMState: @unchecked Sendable {
    var attachments: [PmemAttachment] = []
    /// The vFHA: its page, whether it is read-only, and the scratch page behind it (memslot
    /// `flushHintSlot` in every view).
    var flushHint: (gpa: UInt64, trapped: Bool)?
    var scratch: GuestMemory?
    var physicalFlushes: UInt64 = 0
}

extension KVMView {
    /// A memslot id for an NVDIMM run in this view.
    func freePmemSlot() -> UInt32 {
        var s = pmemFirstSlot
        while pmemRuns[s] != nil { s += 1 }
        return s
    }
}

extension KVMVM {
    /// Deletes the attachments and the vFHA memslots overlapping [gpa, gpa+size) in every view (a
    /// replaced or forgotten attachment: the ABI lets the core attach again at the same gpa).
    /// Called under `layout` (views) and `pmem`.
    private func removeOverlapping(_ views: [KVMView], _ st: inout PmemVMState, _ gpa: UInt64, _ size: UInt64) throws(Errno) {
        func overlaps(_ r: MappedRange) -> Bool { r.gpa < gpa + size && gpa < r.gpa + r.size }
        for a in st.attachments where overlaps(a.range) {
            for v in views {
                for (slot, r) in v.pmemRuns.sorted(by: { $0.key < $1.key }) where overlaps(r) {
                    try v.vm.setUserMemoryRegion(slot: slot, gpa: r.gpa, size: 0, host: nil)
                    v.pmemRuns[slot] = nil
                }
            }
        }
        st.attachments.removeAll { overlaps($0.range) }
        if let h = st.flushHint, overlaps(MappedRange(gpa: h.gpa, size: 4096)) {
            for v in views where v.flushHintMapped {
                try v.vm.setUserMemoryRegion(slot: flushHintSlot, gpa: h.gpa, size: 0, host: nil)
                v.flushHintMapped = false
            }
            st.flushHint = nil
        }
    }

    func attachPmem(_ gpa: UInt64, _ size: UInt64, _ region: UInt32, _ regionOffset: UInt64, _ hostOffset: UInt64) -> npt_status {
        guard size > 0, gpa % 4096 == 0, size % 4096 == 0, regionOffset % 4096 == 0, size <= UInt64(Int.max) else {
            return fail(NPT_ERR_INVALID_ARGUMENT, "attach_pmem: gpa \(hex(gpa)) size \(hex(size)) offset \(hex(regionOffset))")
        }
        guard case .success(let regions) = plugin.hostRegions(), let r = regions.first(where: { $0.id == region }) else {
            return fail(NPT_ERR_NOT_FOUND, "attach_pmem: no host region \(region)")
        }
        guard regionOffset <= r.length, size <= r.length - regionOffset else {
            return fail(NPT_ERR_OUT_OF_RANGE, "attach_pmem: [\(hex(regionOffset)), +\(hex(size))) is past host region \(region)")
        }
        guard case .file(let fd) = r.kind else {
            return fail(NPT_ERR_UNSUPPORTED, "attach_pmem: mapping a real NVDIMM region (\(region)) is not implemented")
        }
        do {
            let m = try FileMapping(fd: fd, offset: regionOffset, size: Int(size))
            try layout.withLock { (lst) throws(Errno) in
                try pmem.withLock { (st) throws(Errno) in
                    try removeOverlapping(lst.views, &st, gpa, size)
                    let whole = MappedRange(gpa: gpa, size: size)
                    for v in lst.views {
                        let slot = v.freePmemSlot()
                        try v.vm.setUserMemoryRegion(slot: slot, flags: v.logging ? kvmMemLogDirty : 0, gpa: gpa, size: size, host: m.base)
                        v.pmemRuns[slot] = whole
                    }
                    st.attachments.append(PmemAttachment(range: whole, region: region, mapping: m))
                }
                lst.cache = [:]
            }
            // The next run brings the views' layouts up to date: only the runs the hierarchy executes.
            layoutDirty.store(true, ordering: .releasing)
            return NPT_OK
        } catch {
            return fail(error, "attach_pmem at \(hex(gpa))")
        }
    }

    /// The vFHA: a scratch page of its own (the core's host_offset names it; the plugin needs no
    /// more), read-only (KVM_MEM_READONLY: a guest write exits as KVM_EXIT_MMIO) when trapped, in
    /// every view. KVM cannot change a memslot's READONLY flag, so the slot is deleted and created again.
    func defineFlushHintPage(_ gpa: UInt64, _ hostOffset: UInt64, _ trapped: Bool) -> npt_status {
        guard gpa % 4096 == 0 else { return fail(NPT_ERR_MISALIGNED, "define_flush_hint_page: gpa \(hex(gpa))") }
        do {
            try layout.withLock { (lst) throws(Errno) in
                try pmem.withLock { (st) throws(Errno) in
                    if st.scratch == nil { st.scratch = try GuestMemory(size: 4096) }
                    if let h = st.flushHint {
                        for v in lst.views where v.flushHintMapped {
                            try v.vm.setUserMemoryRegion(slot: flushHintSlot, gpa: h.gpa, size: 0, host: nil)
                            v.flushHintMapped = false
                        }
                        st.flushHint = nil
                    }
                    try removeOverlapping(lst.views, &st, gpa, 4096)
                    st.flushHint = (gpa, trapped)
                }
                for v in lst.views { try addFlushHintSlot(v) }
            }
            return NPT_OK
        } catch {
            return fail(error, "define_flush_hint_page at \(hex(gpa))")
        }
    }

    /// The vFHA's memslot in view `v` (a new view, or after define_flush_hint_page). Under `layout`.
    func addFlushHintSlot(_ v: KVMView) throws(Errno) {
        try pmem.withLock { (st) throws(Errno) in
            guard let h = st.flushHint, let scratch = st.scratch, !v.flushHintMapped else { return }
            try v.vm.setUserMemoryRegion(slot: flushHintSlot, flags: h.trapped ? kvmMemReadonly : 0, gpa: h.gpa, size: 4096,
                                         host: scratch.base)
            v.flushHintMapped = true
        }
    }

    /// Whether a write to `gpa` is a write to the trapped vFHA.
    func isTrappedFlushHint(_ gpa: UInt64) -> Bool {
        pmem.withLock { st in
            guard let h = st.flushHint, h.trapped else { return false }
            return gpa & ~0xFFF == h.gpa
        }
    }

    /// Whether [gpa, gpa+len) lies in one NVDIMM range.
    func isPmem(_ gpa: UInt64, _ len: Int) -> Bool {
        let (end, o) = gpa.addingReportingOverflow(UInt64(len))
        if o { return false }
        return pmem.withLock { st in
            st.attachments.contains { gpa >= $0.range.gpa && end <= $0.range.gpa + $0.range.size }
        }
    }

    /// Makes view `v`'s NVDIMM memslots exactly the runs of `executable` (the hierarchy's executable
    /// ranges outside RAM, READONLY where it may not write) that lie in the attached ranges: deletes
    /// the runs not wanted first (memslots must never overlap), then creates the missing ones.
    /// Returns the KVM_SET_USER_MEMORY_REGION calls made. Called by installLayout under `layout`.
    func syncPmemRuns(_ v: KVMView, _ executable: [MappedRange]) throws(Errno) -> UInt64 {
        try pmem.withLock { (st) throws(Errno) -> UInt64 in
            var updates: UInt64 = 0
            var wanted: [(MappedRange, PmemAttachment)] = []
            for a in st.attachments {
                let lo = a.range.gpa, hi = a.range.gpa + a.range.size
                for r in executable where r.gpa < hi && lo < r.gpa + r.size {
                    let s = max(r.gpa, lo), e = min(r.gpa + r.size, hi)
                    wanted.append((MappedRange(gpa: s, size: e - s, readonly: r.readonly), a))
                }
            }
            let want = Set(wanted.map { $0.0 })
            for (slot, r) in v.pmemRuns.sorted(by: { $0.key < $1.key }) where !want.contains(r) {
                try v.vm.setUserMemoryRegion(slot: slot, gpa: r.gpa, size: 0, host: nil)
                v.pmemRuns[slot] = nil
                updates += 1
            }
            let have = Set(v.pmemRuns.values)
            for (r, a) in wanted where !have.contains(r) {
                let slot = v.freePmemSlot()
                let flags = r.readonly ? kvmMemReadonly : (v.logging ? kvmMemLogDirty : 0)
                try v.vm.setUserMemoryRegion(slot: slot, flags: flags, gpa: r.gpa, size: r.size,
                                             host: a.mapping.base + Int(r.gpa - a.range.gpa))
                v.pmemRuns[slot] = r
                updates += 1
            }
            return updates
        }
    }

    /// Deletes and creates again view `v`'s NVDIMM memslot `slot` (run `r`) with `flags` (a zap of its
    /// pages' shadows, Views.swift). Under `layout`.
    func recreatePmemRun(_ v: KVMView, _ slot: UInt32, _ r: MappedRange, flags: UInt32) throws(Errno) {
        try pmem.withLock { (st) throws(Errno) in
            guard let a = st.attachments.first(where: { r.gpa >= $0.range.gpa && r.gpa + r.size <= $0.range.gpa + $0.range.size }) else {
                return
            }
            try v.vm.setUserMemoryRegion(slot: slot, gpa: r.gpa, size: 0, host: nil)
            try v.vm.setUserMemoryRegion(slot: slot, flags: flags, gpa: r.gpa, size: r.size, host: a.mapping.base + Int(r.gpa - a.range.gpa))
        }
    }

    /// Runs `body` on the backing of [gpa, gpa+len) if it lies in RAM or in one NVDIMM range.
    func withBacking(_ gpa: UInt64, _ len: Int, _ body: (UnsafeMutableRawPointer) -> Void) -> Bool {
        if memory.contains(gpa, len) { body(memory.base + Int(gpa)); return true }
        let (end, o) = gpa.addingReportingOverflow(UInt64(len))
        if o { return false }
        return pmem.withLock { st in
            guard let a = st.attachments.first(where: { gpa >= $0.range.gpa && end <= $0.range.gpa + $0.range.size }) else {
                return false
            }
            body(a.mapping.base + Int(gpa - a.range.gpa))
            return true
        }
    }

    /// A physical flush: msync(MS_SYNC) of every mapping of `region` in this VM (the file's dirty
    /// pages reach the disk: this backend's WPQ drain), or "1" written to a real region's deep_flush.
    func physicalFlush(_ region: UInt32, _ controller: UInt32, _ address: UInt64) -> npt_status {
        guard case .success(let regions) = plugin.hostRegions(), let r = regions.first(where: { $0.id == region }) else {
            return fail(NPT_ERR_NOT_FOUND, "physical_flush: no host region \(region)")
        }
        let t0 = monotonicNanos()
        switch r.kind {
        case .nd(let path, _, _, _):
            let fd = open(path, O_WRONLY | O_CLOEXEC)
            guard fd >= 0 else { return fail(NPT_ERR_BACKEND, "physical_flush: open \(path): errno \(errno)") }
            defer { close(fd) }
            guard Glibc.write(fd, "1", 1) == 1 else { return fail(NPT_ERR_BACKEND, "physical_flush: write \(path): errno \(errno)") }
        case .file:
            let failed: Int32? = pmem.withLock { st in
                for a in st.attachments where a.region == region {
                    if msync(a.mapping.base, a.mapping.size, MS_SYNC) != 0 { return errno }
                }
                st.physicalFlushes += 1
                return nil
            }
            if let failed { return fail(NPT_ERR_BACKEND, "physical_flush: msync: errno \(failed)") }
        }
        stats.add(.physicalFlushes)
        stats.add(.physicalFlushNanos, monotonicNanos() - t0)
        return NPT_OK
    }
}

extension KVMVCPU {
    /// Nothing to do on KVM: the guest's stores (and CLWB/CLFLUSH write-backs) go straight to the
    /// MAP_SHARED file mapping (or are performed by KVM's emulator into it) and a VM exit is
    /// serializing, so by the time the core handles the vFHA exit every earlier store of the vCPU
    /// is in the host's page cache, where msync finds it.
    func fence() -> npt_status { NPT_OK }

    /// KVM completes the MMIO write on the next KVM_RUN (the written data is dropped: the vFHA's
    /// contents mean nothing). Only checks that the last exit was that write.
    func completeTrappedWrite() -> npt_status {
        guard trappedWritePending else {
            return fail(NPT_ERR_STATE, "vcpu_complete_trapped_write: the last exit was not a write to the trapped vFHA")
        }
        trappedWritePending = false
        return NPT_OK
    }
}
