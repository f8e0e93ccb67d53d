#pragma once

#include <stdexcept>
#include <string>

namespace dattn {

// Every invalid argument raises this, with a message that names the argument and what was expected.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace dattn
