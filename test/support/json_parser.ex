defmodule Kuma.JSONTestParser do
  @moduledoc """
  A strict, small JSON parser for tests (RFC 8259): objects become maps with string keys,
  arrays lists, numbers integers or floats. Used to read what an independent program
  (Python's json module) printed, so Kuma's encoder is not checked against itself.
  """

  @spec parse!(String.t()) :: term()
  def parse!(text) do
    case value(skip(text)) do
      {v, rest} ->
        if skip(rest) == "", do: v, else: raise(ArgumentError, "trailing data: #{inspect(String.slice(rest, 0, 20))}")
    end
  end

  defp skip(<<c, rest::binary>>) when c in [?\s, ?\t, ?\n, ?\r], do: skip(rest)
  defp skip(text), do: text

  defp value("null" <> rest), do: {nil, rest}
  defp value("true" <> rest), do: {true, rest}
  defp value("false" <> rest), do: {false, rest}
  defp value("\"" <> rest), do: string(rest, [])
  defp value("[" <> rest), do: array(skip(rest), [])
  defp value("{" <> rest), do: object(skip(rest), %{})
  defp value(<<c, _::binary>> = text) when c == ?- or c in ?0..?9, do: number(text)
  defp value(text), do: raise(ArgumentError, "unexpected: #{inspect(String.slice(text, 0, 20))}")

  defp array("]" <> rest, []), do: {[], rest}

  defp array(text, acc) do
    {v, rest} = value(skip(text))

    case skip(rest) do
      "," <> rest -> array(skip(rest), [v | acc])
      "]" <> rest -> {Enum.reverse([v | acc]), rest}
    end
  end

  defp object("}" <> rest, acc) when acc == %{}, do: {acc, rest}

  defp object("\"" <> text, acc) do
    {k, rest} = string(text, [])
    ":" <> rest = skip(rest)
    {v, rest} = value(skip(rest))
    acc = Map.put(acc, k, v)

    case skip(rest) do
      "," <> rest -> object(skip(rest), acc)
      "}" <> rest -> {acc, rest}
    end
  end

  defp string("\"" <> rest, acc), do: {acc |> Enum.reverse() |> IO.iodata_to_binary(), rest}
  defp string("\\u" <> <<hex::binary-size(4), rest::binary>>, acc), do: unicode(String.to_integer(hex, 16), rest, acc)

  defp string("\\" <> <<c, rest::binary>>, acc) do
    char = %{?" => ?", ?\\ => ?\\, ?/ => ?/, ?b => ?\b, ?f => ?\f, ?n => ?\n, ?r => ?\r, ?t => ?\t} |> Map.fetch!(c)
    string(rest, [char | acc])
  end

  defp string(<<c::utf8, rest::binary>>, acc) when c >= 0x20, do: string(rest, [<<c::utf8>> | acc])

  # Surrogate pairs (Python escapes non-ASCII by default).
  defp unicode(high, "\\u" <> <<hex::binary-size(4), rest::binary>>, acc) when high in 0xD800..0xDBFF do
    low = String.to_integer(hex, 16)
    string(rest, [<<0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00)::utf8>> | acc])
  end

  defp unicode(code, rest, acc), do: string(rest, [<<code::utf8>> | acc])

  defp number(text) do
    [num | _] = Regex.run(~r/^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/, text)
    rest = binary_part(text, byte_size(num), byte_size(text) - byte_size(num))

    if String.contains?(num, [".", "e", "E"]) do
      {num |> Float.parse() |> elem(0), rest}
    else
      {String.to_integer(num), rest}
    end
  end
end
