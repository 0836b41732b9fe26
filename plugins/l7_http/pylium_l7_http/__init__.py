"""pylium plugin `http`: HTTP/1.1 L7 policy proxy (method, path, host, headers)."""
