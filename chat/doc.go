// Package chat holds what is specific to the model's chat format on both
// sides of generation: turning an OpenAI-style chat request into the
// inputs of the chat template (Prepare), and parsing the model's output
// (reasoning, content and tool calls) incrementally as it is generated
// (Parser). It also builds the grammars that force the tool-call format
// (tool_choice "required" or a named function) and that let reasoning run
// free before a structured answer.
//
// The format is GLM-4.x's: the prompt starts [gMASK]<sop>; turns are
// <|system|>, <|user|>, <|assistant|> and <|observation|> (tool results);
// reasoning sits in <think>...</think>; a tool call is
// <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>
// with string values raw and others as JSON.
package chat
