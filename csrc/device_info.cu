#include <cuda_runtime.h>

#include "device_info.h"

namespace sveb {
int compiled_cudart_version() { return CUDART_VERSION; }
}  // namespace sveb
