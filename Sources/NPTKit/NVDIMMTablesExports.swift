import CNPTKit
import NPTCore
#if canImport(Glibc)
import Glibc
import NPTHost
#endif

// MARK: guest NVDIMM tables and the one host NVDIMM discovery (ABI 1.2)
//
// `@c @implementation` (design.md §3), as every export: the compiler checks each signature against
// its declaration in include/nptkit.h.

@c @implementation
public func npt_vm_get_nvdimm_ssdt(_ vm: OpaquePointer?, _ buf: UnsafeMutableRawPointer?, _ bufLen: Int,
                                   _ needed: UnsafeMutablePointer<Int>?) -> npt_status {
    api(.npt_vm_get_nvdimm_ssdt, [raw(vm), raw(buf), raw(bufLen), raw(needed)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        let n = try require(needed, "needed")
        let bufLen = sizeArg(bufLen)
        if buf == nil && bufLen != 0 { throw .invalid("buf is NULL but buf_len is \(bufLen)") }
        let table = try v.vm.guestNVDIMMSSDT()
        n.pointee = table.count
        guard bufLen >= UInt(table.count), let buf else {
            throw NPTError(.bufferTooSmall, "the SSDT is \(table.count) bytes, buf_len is \(bufLen) (*needed is set)")
        }
        table.withUnsafeBytes { buf.copyMemory(from: $0.baseAddress!, byteCount: table.count) }
    }
}

@c @implementation
public func npt_host_pmem_discover_sysfs(_ root: UnsafePointer<CChar>?,
                                         _ regions: UnsafeMutablePointer<npt_sysfs_pmem_region>?, _ regionsCap: Int,
                                         _ regionCount: UnsafeMutablePointer<Int>?,
                                         _ targets: UnsafeMutablePointer<npt_flush_target>?, _ targetsCap: Int,
                                         _ targetCount: UnsafeMutablePointer<Int>?) -> npt_status {
    api(.npt_host_pmem_discover_sysfs, [raw(root), raw(regions), raw(regionsCap), raw(regionCount), raw(targets), raw(targetsCap), raw(targetCount)]) { () throws(NPTError) in
        let rc = try require(regionCount, "region_count")
        let tc = try require(targetCount, "target_count")
        let regionsCap = sizeArg(regionsCap), targetsCap = sizeArg(targetsCap)
        if regions == nil && regionsCap != 0 { throw .invalid("regions is NULL but regions_cap is \(regionsCap)") }
        if targets == nil && targetsCap != 0 { throw .invalid("targets is NULL but targets_cap is \(targetsCap)") }
        let path = root.map { String(cString: $0) } ?? HostPersistence.defaultSysfsRoot
        if path.isEmpty { throw .invalid("root is empty (NULL means \(HostPersistence.defaultSysfsRoot))") }
        let host = try HostPersistence.fromSysfs(root: path)
        let totalTargets = host.regions.reduce(0) { $0 + $1.flushTargets.count }
        rc.pointee = host.regions.count
        tc.pointee = totalTargets
        guard regionsCap >= UInt(host.regions.count), targetsCap >= UInt(totalTargets) else {
            throw NPTError(.bufferTooSmall, "\(path) holds \(host.regions.count) regions with \(totalTargets) flush targets; regions_cap is \(regionsCap), targets_cap \(targetsCap) (the counts are set)")
        }
        var next = 0
        for (i, r) in host.regions.enumerated() {
            var o = npt_sysfs_pmem_region()
            o.id = r.id
            o.persistence_domain = r.domain.rawValue
            o.base = r.base
            o.length = r.size
            o.controller_count = UInt32(r.controllers.count)
            o.flush_target_count = UInt32(r.flushTargets.count)
            o.first_target = UInt32(next)
            o.deep_flush = r.deepFlushPath == nil ? -1 : (r.flushTargets.isEmpty ? 0 : 1)
            o.needs_wpq_flush = r.needsWPQFlush ? 1 : 0
            regions![i] = o
            for t in r.flushTargets {
                targets![next] = npt_flush_target(controller: t.controller, reserved: 0, address: t.address)
                next += 1
            }
        }
    }
}
