# Tri-state feature options: AUTO (default) turns a feature on where its tool is found.
function(dattn_feature_option name description)
  set(${name} AUTO CACHE STRING "${description}: AUTO, ON or OFF")
  set_property(CACHE ${name} PROPERTY STRINGS AUTO ON OFF)
endfunction()

# Sets DATTN_<X>_ENABLED for each feature; ON with the tool missing is a configure error.
function(_dattn_decide name found why_missing)
  if(${name} STREQUAL "OFF")
    set(enabled OFF)
  elseif(found)
    set(enabled ON)
  elseif(${name} STREQUAL "ON")
    message(FATAL_ERROR "${name}=ON but ${why_missing}")
  else()
    set(enabled OFF)
  endif()
  set(${name}_ENABLED ${enabled} PARENT_SCOPE)
  message(STATUS "dattn: ${name}=${${name}} -> ${enabled}")
endfunction()

macro(dattn_resolve_features)
  # CUDA: AUTO needs nvcc and, while DATTN_CUDA_AUTO_REQUIRES_GPU is ON (plain CMake builds), a
  # visible GPU, so a GPU-less machine never compiles kernels it cannot run unless asked with
  # DATTN_CUDA=ON. The Python package (pyproject.toml) turns the GPU requirement off: with nvcc
  # present its build has the CUDA backend, even in a container build with no GPU visible.
  include(CheckLanguage)
  check_language(CUDA)
  set(_dattn_gpu FALSE)
  find_program(DATTN_NVIDIA_SMI nvidia-smi)
  if(DATTN_NVIDIA_SMI)
    execute_process(COMMAND ${DATTN_NVIDIA_SMI} -L RESULT_VARIABLE _smi_rc OUTPUT_VARIABLE _smi_out ERROR_QUIET)
    if(_smi_rc EQUAL 0 AND _smi_out MATCHES "GPU")
      set(_dattn_gpu TRUE)
    endif()
  endif()
  if(DATTN_CUDA STREQUAL "ON")
    set(_dattn_cuda_found ${CMAKE_CUDA_COMPILER})
  elseif(CMAKE_CUDA_COMPILER AND (_dattn_gpu OR NOT DATTN_CUDA_AUTO_REQUIRES_GPU))
    set(_dattn_cuda_found TRUE)
  else()
    set(_dattn_cuda_found FALSE)
  endif()
  _dattn_decide(DATTN_CUDA "${_dattn_cuda_found}" "no CUDA compiler (nvcc) was found")

  # BLAS (any vendor CMake's FindBLAS knows; BLA_VENDOR picks one) with cblas.h: the C++
  # multi-head modules' projections. The Python package does not use them and builds without it.
  find_package(BLAS QUIET)
  set(_dattn_blas_found FALSE)
  if(BLAS_FOUND)
    find_path(DATTN_CBLAS_INCLUDE cblas.h PATH_SUFFIXES openblas blis flexiblas mkl
              PATHS /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu)
    if(DATTN_CBLAS_INCLUDE)
      set(_dattn_blas_found TRUE)
    endif()
  endif()
  _dattn_decide(DATTN_BLAS "${_dattn_blas_found}" "no BLAS with cblas.h was found (install libopenblas-dev, or set BLA_VENDOR)")

  find_package(MPI QUIET COMPONENTS CXX)
  _dattn_decide(DATTN_MPI "${MPI_CXX_FOUND}" "MPI was not found (install libopenmpi-dev)")

  # DATTN_NCCL_ROOT (environment): a folder with include/nccl.h and lib/libnccl.so*, such as the
  # nvidia-nccl wheel's that PyTorch ships.
  find_path(DATTN_NCCL_INCLUDE nccl.h HINTS $ENV{DATTN_NCCL_ROOT}/include /usr/include /usr/local/cuda/include)
  find_library(DATTN_NCCL_LIBRARY NAMES nccl libnccl.so.2
               HINTS $ENV{DATTN_NCCL_ROOT}/lib /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64)
  if(DATTN_NCCL_INCLUDE AND DATTN_NCCL_LIBRARY AND DATTN_CUDA_ENABLED)
    set(_dattn_nccl_found TRUE)
  else()
    set(_dattn_nccl_found FALSE)
  endif()
  _dattn_decide(DATTN_NCCL "${_dattn_nccl_found}" "NCCL needs the CUDA backend and nccl.h / libnccl")

  find_package(Python 3.9 QUIET COMPONENTS Interpreter Development.Module)
  set(_dattn_python_found FALSE)
  if(Python_FOUND)
    execute_process(COMMAND ${Python_EXECUTABLE} -m nanobind --cmake_dir
                    OUTPUT_VARIABLE _nb_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _nb_rc ERROR_QUIET)
    if(_nb_rc EQUAL 0)
      set(_dattn_python_found TRUE)
      set(DATTN_NANOBIND_DIR "${_nb_dir}")
    endif()
  endif()
  _dattn_decide(DATTN_PYTHON "${_dattn_python_found}" "Python development files or nanobind were not found")
endmacro()
