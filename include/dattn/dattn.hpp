#pragma once

#include "dattn/attention.hpp"
#include "dattn/block_sparse.hpp"
#include "dattn/config.hpp"
#include "dattn/decode.hpp"
#include "dattn/error.hpp"
#include "dattn/hilbert.hpp"
#if defined(DATTN_WITH_CPP_MODULES)  // built with a BLAS (CMake option DATTN_BLAS)
#include "dattn/modules.hpp"
#endif
#include "dattn/philox.hpp"
#include "dattn/ring.hpp"
#include "dattn/tensor.hpp"
#include "dattn/varlen.hpp"
