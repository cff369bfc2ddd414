// Error reporting for the C++ core: one macro, two exception types.
// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into RuntimeError.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#define FK_CHECK(cond, msg)                                                   \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::ostringstream fk_check_os_;                                        \
      fk_check_os_ << msg;                                                    \
      throw std::invalid_argument(fk_check_os_.str());                        \
    }                                                                         \
  } while (0)

#define FK_RUNTIME_CHECK(cond, msg)                                           \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::ostringstream fk_check_os_;                                        \
      fk_check_os_ << msg;                                                    \
      throw std::runtime_error(fk_check_os_.str());                           \
    }                                                                         \
  } while (0)
