#pragma once

#include "dattn/attention.hpp"
#include "dattn/block_sparse.hpp"
#include "dattn/config.hpp"
#include "dattn/decode.hpp"
#include "dattn/error.hpp"
#include "dattn/hilbert.hpp"
#include "dattn/modules.hpp"
#include "dattn/philox.hpp"
#include "dattn/ring.hpp"
#include "dattn/tensor.hpp"
#include "dattn/varlen.hpp"
