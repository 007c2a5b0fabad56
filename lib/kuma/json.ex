defmodule Kuma.JSON do
  @moduledoc """
  A small JSON encoder (RFC 8259), written because hex.pm (and so `jason`) is not
  reachable. It encodes exactly what Kuma emits: maps with atom or string keys, lists,
  UTF-8 strings, integers, finite floats, booleans and `nil`. Anything else (tuples, PIDs,
  non-UTF-8 binaries, NaN) raises `ArgumentError` rather than producing invalid JSON.
  Key order follows the map's iteration order; pass a keyword-like list of pairs wrapped
  in `{:object, pairs}` to fix the order.

      iex> Kuma.JSON.encode!(%{"a" => [1, 2.5, true, nil, "x\\ny"]})
      ~s({"a":[1,2.5,true,null,"x\\\\ny"]})
      iex> Kuma.JSON.encode!({:object, [b: 1, a: 2]})
      ~s({"b":1,"a":2})
  """

  @doc "Encodes `term` as a JSON string; raises `ArgumentError` for unsupported terms."
  @spec encode!(term()) :: String.t()
  def encode!(term), do: term |> encode_iodata() |> IO.iodata_to_binary()

  @doc "Like `encode!/1` but returns iodata."
  @spec encode_iodata(term()) :: iodata()
  def encode_iodata(nil), do: "null"
  def encode_iodata(true), do: "true"
  def encode_iodata(false), do: "false"
  def encode_iodata(n) when is_integer(n), do: Integer.to_string(n)
  def encode_iodata(f) when is_float(f), do: :erlang.float_to_binary(f, [:short])
  def encode_iodata(a) when is_atom(a), do: string(Atom.to_string(a))
  def encode_iodata(s) when is_binary(s), do: string(s)
  def encode_iodata(list) when is_list(list), do: [?[, list |> Enum.map(&encode_iodata/1) |> Enum.intersperse(?,), ?]]
  def encode_iodata({:object, pairs}) when is_list(pairs), do: object(pairs)
  def encode_iodata(%_{} = struct), do: raise(ArgumentError, "cannot encode struct #{inspect(struct)} as JSON")
  def encode_iodata(map) when is_map(map), do: object(Map.to_list(map))
  def encode_iodata(other), do: raise(ArgumentError, "cannot encode #{inspect(other)} as JSON")

  defp object(pairs) do
    members =
      Enum.map(pairs, fn
        {k, v} when is_atom(k) or is_binary(k) -> [string(to_string(k)), ?:, encode_iodata(v)]
        {k, _} -> raise ArgumentError, "JSON object keys must be atoms or strings, got: #{inspect(k)}"
      end)

    [?{, Enum.intersperse(members, ?,), ?}]
  end

  defp string(s) do
    if not String.valid?(s), do: raise(ArgumentError, "cannot encode non-UTF-8 binary #{inspect(s)} as a JSON string")
    [?", escape(s, 0, s, []), ?"]
  end

  # Copies unescaped runs as sub-binaries and escapes ", \ and control characters.
  defp escape(<<c, rest::binary>>, len, orig, acc) when c in [?", ?\\] or c < 0x20 do
    start = byte_size(orig) - byte_size(rest) - 1 - len
    escape(rest, 0, orig, [acc, binary_part(orig, start, len), escape_char(c)])
  end

  defp escape(<<_c, rest::binary>>, len, orig, acc), do: escape(rest, len + 1, orig, acc)
  defp escape(<<>>, len, orig, acc), do: [acc, binary_part(orig, byte_size(orig) - len, len)]

  defp escape_char(?"), do: "\\\""
  defp escape_char(?\\), do: "\\\\"
  defp escape_char(?\n), do: "\\n"
  defp escape_char(?\r), do: "\\r"
  defp escape_char(?\t), do: "\\t"
  defp escape_char(c), do: "\\u" <> String.pad_leading(Integer.to_string(c, 16), 4, "0")
end
