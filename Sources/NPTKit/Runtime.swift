import NPTCore
import NPTSimulator
import Synchronization

/// Swift entry points for tools linked with this module (the CLI): the same registry setup and
/// plugin loading that the C ABI uses.
package enum NPTKitRuntime {
    /// A registry with the built-in simulator as the default backend.
    package static func makeRegistry() -> BackendRegistry { makeRegistryWithSimulator().registry }

    static func makeRegistryWithSimulator() -> (registry: BackendRegistry, simulator: SimulatorBackend) {
        let r = BackendRegistry()
        let sim = SimulatorBackend()
        try! r.register(sim, makeDefault: true)
        return (r, sim)
    }

    private static let context = ContextBox()
    private static let vmHandles = NPTMutex<[ObjectIdentifier: UInt]>([:])

    /// Creates a VM as `npt_vm_create` does, with a handle, so that C-table backends and plugins
    /// (which reach the core through the host API by that handle) work from Swift too. Destroy it
    /// with `destroyVM`.
    package static func makeVM(config: VMConfig, registry: BackendRegistry) throws(NPTError) -> VirtualMachine {
        let h = Handles.reserve()
        let vm: VirtualMachine
        do { vm = try VirtualMachine(config: config, registry: registry, handle: UnsafeMutableRawPointer(h)) } catch {
            Handles.remove(h)
            throw error
        }
        Handles.bind(h, VMBox(vm: vm, ctx: context, handle: h))
        vmHandles.withLock { $0[ObjectIdentifier(vm)] = UInt(bitPattern: h) }
        return vm
    }

    /// Destroys a VM made by `makeVM` and releases its handle.
    package static func destroyVM(_ vm: VirtualMachine) throws(NPTError) {
        try vm.destroy()
        if let h = vmHandles.withLock({ $0.removeValue(forKey: ObjectIdentifier(vm)) }) {
            Handles.remove(OpaquePointer(bitPattern: h)!)
        }
    }

    /// Loads a backend plugin (.so) into `registry`, giving it `arguments` (plugin interface 2:
    /// npt_plugin_init; a plugin of interface 1 takes none); returns the backend's name.
    @discardableResult
    package static func loadPlugin(_ path: String, arguments: [PluginArgument] = [], into registry: BackendRegistry) throws(NPTError) -> String {
        let b = try PluginLoader.load(path, arguments: arguments)
        try registry.register(b)
        return b.name
    }

    /// Starts recording every npt_ call of this process into `path` (the call-trace format of
    /// `nptkit-cli replay-calls`), as NPTKIT_CALL_TRACE does from the first call; `bench` uses it.
    package static func startCallTrace(path: String) throws(NPTError) { try CallTrace.start(path: path) }
    /// Writes the trace out and stops recording.
    package static func stopCallTrace() { CallTrace.stop() }
}
