#pragma once

namespace sveb {
// CUDART_VERSION seen by nvcc when the kernels were compiled.
int compiled_cudart_version();
}  // namespace sveb
