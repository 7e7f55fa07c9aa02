"""Photos from outside: their headers read and cleaned without a decoder (headers, exif), and their decode in worker
processes under limits that the operating system enforces (pool; the workers run decoder)."""
