"""What the SQL databases share: schema, migrations, transport and the common SQL."""
