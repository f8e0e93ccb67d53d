include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS dattn EXPORT dattnTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY include/dattn DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT dattnTargets NAMESPACE dattn:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/dattn)
configure_package_config_file(cmake/dattnConfig.cmake.in
                              ${CMAKE_CURRENT_BINARY_DIR}/dattnConfig.cmake
                              INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/dattn)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/dattnConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/dattnConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/dattnConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/dattn)
