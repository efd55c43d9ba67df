import CNPTKit
import NPTCore
import NPTKit
#if canImport(Glibc)
import Glibc
#endif

/// A context and a 1 GiB R|W VM made through the C ABI (the C-path benchmarks), and the config used.
func makeCVM() throws -> (OpaquePointer?, OpaquePointer?, npt_vm_config) {
    var ctx: OpaquePointer?
    var vm: OpaquePointer?
    guard npt_context_create(&ctx) == NPT_OK else { throw NPTError(.state, "npt_context_create failed") }
    var cfg = npt_vm_config()
    cfg.size = UInt32(MemoryLayout<npt_vm_config>.size)
    cfg.ram_size = 1 << 30
    cfg.default_perms = EPTPermissions([.read, .write]).rawValue
    guard npt_vm_create(ctx, &cfg, &vm) == NPT_OK else {
        _ = npt_context_destroy(ctx)
        throw NPTError(.state, String(cString: npt_last_error()))
    }
    return (ctx, vm, cfg)
}

extension Bench {
    /// Call tracing: npt_policy_get untraced against traced (batches interleaved, one process), and
    /// replay-calls' speed on a trace of the same calls against libnptkit.so beside this executable.
    func benchCallTrace() throws {
        print("C ABI call tracing (NPTKIT_CALL_TRACE) and replay (nptkit-cli replay-calls)")
        let batches = quick ? 20 : 200
        let batch = 200
        let cGet: @convention(c) (OpaquePointer?, UInt64, UnsafeMutablePointer<UInt64>?) -> npt_status = npt_policy_get
        var (ctx, vm, cfg) = try makeCVM()
        defer { _ = npt_vm_destroy(vm); _ = npt_context_destroy(ctx) }
        let path = "/tmp/nptkit-bench-calltrace-\(getpid()).trace"
        defer { unlink(path) }
        var plain: [Duration] = [], traced: [Duration] = []
        var sink: UInt64 = 0
        let clock = ContinuousClock()
        try NPTKitRuntime.startCallTrace(path: path)
        NPTKitRuntime.stopCallTrace()
        for i in 0..<batches {
            plain.append(clock.measure {
                var v: UInt64 = 0
                for j in 0..<batch { _ = cGet(vm, UInt64((i + j) % 4096) << 12, &v); sink &+= v }
            } / batch)
            try NPTKitRuntime.startCallTrace(path: path)
            traced.append(clock.measure {
                var v: UInt64 = 0
                for j in 0..<batch { _ = cGet(vm, UInt64((i + j) % 4096) << 12, &v); sink &+= v }
            } / batch)
            if i + 1 < batches { NPTKitRuntime.stopCallTrace() }
        }
        NPTKitRuntime.stopCallTrace()
        var t = Table(["call", "untraced median", "traced median", "traced / untraced"])
        t.add(["npt_policy_get (\(batches) x \(batch) calls each)", show(median(plain)), show(median(traced)),
               fmt(seconds(median(traced)) / seconds(median(plain)))])
        print(t.render())

        // Replay: a trace of a context, a VM and `calls` npt_policy_get, replayed through ffi_call.
        let calls = quick ? 5_000 : 50_000
        try NPTKitRuntime.startCallTrace(path: path)
        var c2: OpaquePointer?, v2: OpaquePointer?
        _ = npt_context_create(&c2)
        _ = npt_vm_create(c2, &cfg, &v2)
        var v: UInt64 = 0
        for j in 0..<calls { _ = cGet(v2, UInt64(j % 4096) << 12, &v) }
        _ = npt_vm_destroy(v2)
        _ = npt_context_destroy(c2)
        NPTKitRuntime.stopCallTrace()
        let bytes = try readWholeFile(path)
        let lib = try CallReplayer.openLibrary(nil)
        var runs: [Double] = []
        for _ in 0..<(quick ? 1 : 5) {
            var r = try CallReplayer(trace: bytes, library: lib, verbose: false)
            var outcome: CallReplayer.Outcome = .done(calls: 0, threads: 0)
            let d = clock.measure { outcome = r.run() }
            guard case .done(let n, _) = outcome else { throw NPTError(.state, "the bench's own trace did not replay: \(outcome)") }
            runs.append(Double(n) / seconds(d))
        }
        runs.sort()
        print("   replay-calls: \(calls + 4) calls (\(bytes.count / 1024) KiB), median of \(runs.count) runs: \(Int(runs[runs.count / 2])) calls/s, 0 mismatches")
        print("   (checksum \(sink & 1))\n")
    }
}
