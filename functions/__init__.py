"""callbridge runtime code. Chalice ships it through the vendor/functions symlink."""
