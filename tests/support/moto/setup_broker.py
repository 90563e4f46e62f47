"""Prepares the moto server for latchkey's tests, then turns IAM enforcement on.

Creates the IAM user the broker runs as (allowed everything, as the tests also create roles with
it), prints its access key as shell `export` lines, and calls `/moto-api/reset-auth` with `0`, so
that from then on every request must be signed by a known principal and is checked against its
policies: a deny attached to a role then refuses that role's sessions.

Usage: python setup_broker.py http://127.0.0.1:PORT
"""

import json
import sys
import urllib.request

import boto3

url = sys.argv[1]
iam = boto3.client(
    "iam", endpoint_url=url, region_name="us-east-1",
    aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
)
iam.create_user(UserName="latchkey-broker")
iam.put_user_policy(
    UserName="latchkey-broker",
    PolicyName="everything",
    PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    ),
)
key = iam.create_access_key(UserName="latchkey-broker")["AccessKey"]
request = urllib.request.Request(
    f"{url}/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}, method="POST"
)
urllib.request.urlopen(request, timeout=10).read()
print(f"export AWS_ACCESS_KEY_ID={key['AccessKeyId']}")
print(f"export AWS_SECRET_ACCESS_KEY={key['SecretAccessKey']}")
