import NPTCore
import NPTKit
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The KVM plugin built beside the test binary (swift build builds every product).
func kvmPluginPath() -> String? {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    guard n > 0 else { return nil }
    var dir = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    // .../debug/NPTKitPackageTests.xctest
    dir = String(dir[..<dir.lastIndex(of: "/")!])
    let p = dir + "/libnptkit-kvm.so"
    return access(p, R_OK) == 0 ? p : nil
}

@Suite struct RuntimeTests {
    /// A C-table backend reaches the core through the host API by the VM's handle: a VM made without
    /// one is refused (it would run with no policy), and NPTKitRuntime.makeVM gives it one.
    @Test(.enabled(if: kvmPluginPath() != nil, "libnptkit-kvm.so is not beside the test binary"))
    func pluginVMsNeedAHandle() throws {
        let registry = NPTKitRuntime.makeRegistry()
        try NPTKitRuntime.loadPlugin(kvmPluginPath()!, into: registry)
        let config = VMConfig(ramSize: 1 << 20, mbecMode: .lazy, backendName: "kvm")
        let refused = Result { () throws(NPTError) in try VirtualMachine(config: config, registry: registry) }
        if case .failure(let error) = refused {
            #expect(error.code == .invalidArgument)
            #expect(error.message.contains("NPTKitRuntime.makeVM"))
        } else {
            Issue.record("a handle-less VM on a C-table backend was created")
        }
        switch Result(catching: { () throws(NPTError) in try NPTKitRuntime.makeVM(config: config, registry: registry) }) {
        case .success(let vm):
            // The backend sees the policy through the handle: a policy change is accepted and the
            // VM is destroyed with its handle.
            try vm.setPolicy(PolicyRange(start: GPA(0x1000), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]))
            try NPTKitRuntime.destroyVM(vm)
        case .failure(let e):
            #expect(e.code == .unsupported, "\(e)")
            print("RuntimeTests: SKIPPED the VM half: \(e.message) (no usable /dev/kvm)")
        }
    }
}
