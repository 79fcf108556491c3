import unittest

from sample_lib import format_cents


class FormatCents(unittest.TestCase):
    def test_whole_and_negative(self):
        self.assertEqual(format_cents(1234), "12.34")
        self.assertEqual(format_cents(-5), "-0.05")


if __name__ == "__main__":
    unittest.main()
