#include <gtest/gtest.h>
TEST(Tmp, X) { EXPECT_TRUE(true); }
