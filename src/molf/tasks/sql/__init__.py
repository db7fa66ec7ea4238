"""Text-to-SQL (the ``sql`` task): Spider and ``gretelai/synthetic_text_to_sql``.

- :mod:`~molf.tasks.sql.task`: records, loading, :class:`~molf.tasks.sql.task.SqlTask`;
- :mod:`~molf.tasks.sql.split`: which records are trained on, validated on, tested on,
  and the ``--data PATH#MODE`` syntax;
- :mod:`~molf.tasks.sql.spider`: Spider schemas as CREATE TABLE statements;
- :mod:`~molf.tasks.sql.literals` and :mod:`~molf.tasks.sql.populate`: seeded random
  rows for a Spider schema, drawn from the constants of its queries;
- :mod:`~molf.tasks.sql.sqlite`: running SQL in throwaway in-memory SQLite databases;
- :mod:`~molf.tasks.sql.text` and :mod:`~molf.tasks.sql.score`: comparing generated
  SQL with the gold query, and the metrics.
"""
