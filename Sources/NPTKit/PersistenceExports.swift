import CNPTKit
import NPTCore
import NPTSimulator
#if canImport(Glibc)
import Glibc
#endif

// MARK: virtualized NVDIMM WPQ flushing (ABI 1.1)

/// The host's persistent-memory regions as the VM's backend discovers them, sorted by id.
private func hostRegions(_ v: VMBox) throws(NPTError) -> [HostPersistence.Region] {
    try v.vm.hostPersistence().regions.sorted { $0.id < $1.id }
}

@c @implementation
public func npt_vm_host_pmem_count(_ vm: OpaquePointer?, _ count: UnsafeMutablePointer<Int>?) -> npt_status {
    api(.npt_vm_host_pmem_count, [raw(vm), raw(count)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        let out = try require(count, "count")
        out.pointee = try hostRegions(v).count
    }
}

@c @implementation
public func npt_vm_host_pmem_get(_ vm: OpaquePointer?, _ index: Int, _ out: UnsafeMutablePointer<npt_host_pmem_region>?) -> npt_status {
    let index = sizeArg(index)
    return api(.npt_vm_host_pmem_get, [raw(vm), raw(index), raw(out)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        _ = try readVersioned(UnsafePointer(out), "out")
        let regions = try hostRegions(v)
        guard index < UInt(regions.count) else {
            throw NPTError(.notFound, "index \(index) is past the \(regions.count) host persistent-memory regions")
        }
        let r = regions[Int(index)]
        var o = npt_host_pmem_region()
        o.id = r.id; o.base = r.base; o.length = r.size
        o.controller_count = UInt32(r.controllers.count)
        o.flush_target_count = UInt32(r.flushTargets.count)
        o.needs_wpq_flush = r.needsWPQFlush ? 1 : 0
        try writeVersioned(o, out, "out")
    }
}

@c @implementation
public func npt_vm_add_nvdimm(_ vm: OpaquePointer?, _ nvdimm: UnsafePointer<npt_nvdimm>?) -> npt_status {
    api(.npt_vm_add_nvdimm, [raw(vm), raw(nvdimm)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        let n = try readVersioned(nvdimm, "nvdimm")
        if n.length == 0 { throw .invalid("nvdimm->length is 0") }
        try v.vm.addNVDIMM(gpa: GPA(n.gpa), size: n.length, hostRegion: n.host_region, regionOffset: n.region_offset)
    }
}

/// The vFHA, or NPT_ERR_STATE when the VM has no NVDIMM range.
private func requireFlushHint(_ v: VMBox) throws(NPTError) -> GPA {
    guard let vfha = v.vm.virtualFlushHint else {
        throw NPTError(.state, "the VM has no NVDIMM range (add one with npt_vm_add_nvdimm), so no flush hint")
    }
    return vfha
}

@c @implementation
public func npt_vm_get_flush_hint(_ vm: OpaquePointer?, _ info: UnsafeMutablePointer<npt_flush_hint_info>?) -> npt_status {
    api(.npt_vm_get_flush_hint, [raw(vm), raw(info)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        _ = try readVersioned(UnsafePointer(info), "info")
        let vfha = try requireFlushHint(v)
        var o = npt_flush_hint_info()
        o.trapped = v.vm.flushHintTrapped ? 1 : 0
        o.vfha = vfha.raw
        o.target_count = UInt32(v.vm.flushTargets.count)
        o.nvdimm_count = UInt32(v.vm.nvdimmRanges.count)
        try writeVersioned(o, info, "info")
    }
}

@c @implementation
public func npt_vm_get_flush_target(_ vm: OpaquePointer?, _ index: Int, _ hostRegion: UnsafeMutablePointer<UInt32>?,
                                    _ controller: UnsafeMutablePointer<UInt32>?, _ address: UnsafeMutablePointer<UInt64>?) -> npt_status {
    let index = sizeArg(index)
    return api(.npt_vm_get_flush_target, [raw(vm), raw(index), raw(hostRegion), raw(controller), raw(address)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        let r = try require(hostRegion, "host_region")
        let c = try require(controller, "controller")
        let a = try require(address, "address")
        _ = try requireFlushHint(v)
        let targets = v.vm.flushTargets
        guard index < UInt(targets.count) else {
            throw NPTError(.notFound, "index \(index) is past the VM's \(targets.count) flush targets")
        }
        let t = targets[Int(index)]
        r.pointee = t.region; c.pointee = t.target.controller; a.pointee = t.target.address
    }
}

@c @implementation
public func npt_vm_set_flush_options(_ vm: OpaquePointer?, _ trap: UInt32, _ coalesce: Int32) -> npt_status {
    api(.npt_vm_set_flush_options, [raw(vm), raw(trap), raw(coalesce)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        guard let t = FlushOptions.Trap(rawValue: trap) else {
            throw .invalid("trap \(trap) is not NPT_FLUSH_TRAP_AUTO, _ALWAYS or _NEVER (0, 1, 2)")
        }
        try v.vm.setFlushOptions(FlushOptions(trap: t, coalesce: coalesce != 0))
    }
}

@c @implementation
public func npt_vm_get_nfit(_ vm: OpaquePointer?, _ buf: UnsafeMutableRawPointer?, _ bufLen: Int,
                            _ needed: UnsafeMutablePointer<Int>?) -> npt_status {
    let bufLen = sizeArg(bufLen)
    return api(.npt_vm_get_nfit, [raw(vm), raw(buf), raw(bufLen), raw(needed)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        let n = try require(needed, "needed")
        if buf == nil && bufLen != 0 { throw .invalid("buf is NULL but buf_len is \(bufLen)") }
        let table = try v.vm.guestNFIT()
        n.pointee = table.count
        guard bufLen >= UInt(table.count), let buf else {
            throw NPTError(.bufferTooSmall, "the NFIT is \(table.count) bytes, buf_len is \(bufLen) (*needed is set)")
        }
        table.withUnsafeBytes { buf.copyMemory(from: $0.baseAddress!, byteCount: table.count) }
    }
}

@c @implementation
public func npt_vm_get_flush_stats(_ vm: OpaquePointer?, _ stats: UnsafeMutablePointer<npt_flush_stats>?) -> npt_status {
    api(.npt_vm_get_flush_stats, [raw(vm), raw(stats)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        _ = try readVersioned(UnsafePointer(stats), "stats")
        let s = v.vm.flushStatistics()
        var o = npt_flush_stats()
        o.guest_flushes = s.guestFlushes; o.exits = s.exits; o.physical_flushes = s.physicalFlushes
        o.coalesced = s.coalesced; o.untrapped_writes = s.untrappedWrites; o.flush_ns_total = s.flushNanosTotal
        try writeVersioned(o, stats, "stats")
    }
}

@c @implementation
public func npt_vm_power_failure(_ vm: OpaquePointer?) -> npt_status {
    api(.npt_vm_power_failure, [raw(vm)]) { () throws(NPTError) in
        try Handles.get(vm, VMBox.self, "vm").vm.powerFailure()
    }
}

@c @implementation
public func npt_sim_set_platform(_ ctx: OpaquePointer?, _ platform: UnsafePointer<npt_sim_platform>?) -> npt_status {
    api(.npt_sim_set_platform, [raw(ctx), raw(platform)]) { () throws(NPTError) in
        let c = try Handles.get(ctx, ContextBox.self, "ctx")
        try c.life.enter()
        defer { c.life.leave() }
        let p = try readVersioned(platform, "platform")
        let sim = c.simulator
        let drains = p.wpq_drains_on_power_loss != 0
        var description: PlatformDescription
        let nfitLen = sizeArg(p.nfit_len)
        if let nfit = p.nfit {
            guard nfitLen > 0 else { throw .invalid("platform->nfit is set but platform->nfit_len is 0") }
            guard nfitLen <= UInt(UInt32.max) else {
                throw .invalid("platform->nfit_len is \(nfitLen); an ACPI table is at most 4 GiB (its length field is 32 bits)")
            }
            let bytes = Array(UnsafeRawBufferPointer(start: nfit, count: Int(nfitLen)))
            description = try PlatformDescription.from(nfit: try NFIT.parse(bytes), flushLatencyNanos: p.flush_latency_ns)
            if drains { description.domain = .memoryController }
        } else {
            guard nfitLen == 0 else { throw .invalid("platform->nfit is NULL but platform->nfit_len is \(nfitLen)") }
            description = .standard(needsWPQFlush: !drains, flushLatencyNanos: p.flush_latency_ns)
        }
        try sim.setPlatform(description)
    }
}
