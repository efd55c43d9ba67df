/// What a backend is told beyond what it must do (the default of `BackendVCPU.exitDecided`), and
/// how a backend that wraps another says so.

extension BackendVCPU {
    /// A backend that runs guest code has nothing to do with the core's answer to an exit.
    package func exitDecided(_ action: ExitAction, exit: VMExit) throws(NPTError) {}
}

/// A backend that changes what another one advertises and passes its work on to it
/// (`WithheldCapabilities` in NPTScenarios): `wrapped` is the one that does the work, for a VMM that
/// looks for a property of the real backend (the NVDIMM scenario's crash checker watching the
/// simulator's platform). The recording layer is not one: it wraps a backend's VMs, not the backend.
package protocol BackendWrapper: Backend {
    var wrapped: any Backend { get }
}

extension Backend {
    /// The innermost backend behind any wrappers.
    package var unwrapped: any Backend {
        var b: any Backend = self
        while let w = b as? any BackendWrapper { b = w.wrapped }
        return b
    }
}
