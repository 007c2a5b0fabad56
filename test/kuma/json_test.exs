defmodule Kuma.JSONTest do
  use ExUnit.Case, async: true
  doctest Kuma.JSON
  doctest Kuma.Export

  alias Kuma.JSON

  test "scalars, nesting and escapes" do
    assert JSON.encode!(%{}) == "{}"
    assert JSON.encode!([]) == "[]"
    assert JSON.encode!(-12) == "-12"
    assert JSON.encode!(0.1) == "0.1"
    assert JSON.encode!(1.0e100) == "1.0e100"
    assert JSON.encode!(:atom) == ~s("atom")
    assert JSON.encode!("q\"b\\s\u0001é😀") == ~s("q\\"b\\\\s\\u0001é😀")
    assert JSON.encode!(%{a: %{b: [1, %{c: nil}]}}) == ~s({"a":{"b":[1,{"c":null}]}})
  end

  test "refuses what JSON cannot represent" do
    for bad <- [{1, 2}, self(), <<0xFF>>, %{{1} => 2}, %URI{}, make_ref()] do
      assert_raise ArgumentError, fn -> JSON.encode!(bad) end
    end
  end

  @tag :python
  test "an independent parser (Python's json module) reads back exactly what was encoded" do
    python = System.find_executable("python3") || flunk("python3 is needed for this test")

    value = %{
      "text" => "line1\nline2\t\"quoted\" \\ back \u0000 nul \u001F é 漢字 😀",
      "ints" => [0, -1, 9_007_199_254_740_993, 123_456_789_012_345_678_901_234_567_890],
      "floats" => [0.5, -2.25e-10, 6.02e23],
      "nested" => %{"list" => [true, false, nil, [], %{}]}
    }

    path = Path.join(System.tmp_dir!(), "kuma_json_#{System.unique_integer([:positive])}.json")
    File.write!(path, JSON.encode!(value))
    on_exit(fn -> File.rm(path) end)
    # Python parses the file and prints it back canonically (sorted keys, ASCII escapes).
    script = "import json,sys; print(json.dumps(json.load(open(sys.argv[1])), sort_keys=True))"
    {out, 0} = System.cmd(python, ["-c", script, path])

    parsed = String.trim(out)
    assert parsed =~ ~s("ints": [0, -1, 9007199254740993, 123456789012345678901234567890])
    assert parsed =~ ~s("floats": [0.5, -2.25e-10, 6.02e+23])
    assert parsed =~ ~s("nested": {"list": [true, false, null, [], {}]})
    assert parsed =~ ~s(\\u6f22\\u5b57 \\ud83d\\ude00)
    assert parsed =~ ~s(line1\\nline2\\t\\"quoted\\" \\\\ back \\u0000 nul \\u001f)
  end
end
